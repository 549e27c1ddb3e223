"""What the coordination tables' APIs share: the engine, the dialect's INSERT ... ON CONFLICT, and the clock.

PostgreSQL and SQLite are the two databases supported; both spell an upsert the same way through SQLAlchemy's
dialect `insert`, and both tell the time, so leases expire by one clock however many machines use them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

SUPPORTED_DIALECTS = ("postgresql", "sqlite")

# Seconds since the epoch by the database's own clock.
_NOW_SQL = {
    "postgresql": "SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8",
    "sqlite": "SELECT (julianday('now') - 2440587.5) * 86400.0",
}


def utc_now() -> str:
    """The timestamps of runs and stages: ISO 8601 UTC to the millisecond, as state.json wrote them."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Database:
    """An engine on a coordination database whose schema is at the migrations' head (see `db.connect`)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def insert(self, table: sa.Table) -> Any:
        """`INSERT` with `.on_conflict_do_nothing()` / `.on_conflict_do_update()`, in this database's dialect."""
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    def clock(self, conn: sa.Connection) -> float:
        """The database's time in seconds since the epoch: what lease expiry is measured by."""
        return float(conn.exec_driver_sql(_NOW_SQL[self.dialect]).scalar_one())
