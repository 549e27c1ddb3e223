"""Coordination in a database instead of files beside the data: run and stage state, leases (the run lock and the
shared locks) and test-part membership, in PostgreSQL (`FASHION_TAGGER_DATABASE_URL`) or a SQLite file in the home.

`connect(url, home)` returns a `Coordinator` on a schema the Alembic migrations in `migrations/` brought to head.
"""

from fashion_tagger.coordination.db import (
    DATABASE_URL_ENV,
    CoordinationUnavailableError,
    Coordinator,
    connect,
    require_database_url,
)
from fashion_tagger.coordination.leases import HeldLease, LeaseBusyError, LeaseInfo
from fashion_tagger.coordination.legacy import ImportSummary, import_legacy
from fashion_tagger.coordination.membership import MEMBERSHIP_PARTS, TEST_PART, TRAIN_VAL_PART
from fashion_tagger.coordination.state import STAGE_STATUSES, RunRecord, StageEntry

__all__ = [
    "DATABASE_URL_ENV", "MEMBERSHIP_PARTS", "STAGE_STATUSES", "TEST_PART", "TRAIN_VAL_PART",
    "CoordinationUnavailableError", "Coordinator", "HeldLease", "ImportSummary", "LeaseBusyError", "LeaseInfo",
    "RunRecord", "StageEntry", "connect", "import_legacy", "require_database_url",
]
