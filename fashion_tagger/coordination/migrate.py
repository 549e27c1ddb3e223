"""The coordination schema brought to the newest migration, by Alembic from code (no alembic.ini), under a lock.

Two processes connecting at once must not both migrate: PostgreSQL serialises them on a transaction-scoped
advisory lock, SQLite on its write lock (every transaction here begins IMMEDIATE); the second finds the schema
at head and does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from fashion_tagger.coordination.schema import VERSION_TABLE

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
_ADVISORY_LOCK_KEY = 0x66742D636F6F7264  # "ft-coord": one key for every migrating process of any machine


@contextmanager
def _alembic_quiet() -> Iterator[None]:
    """Alembic logs at INFO when imported (a line per plugin) and on every connect ("Context impl SQLiteImpl."):
    it is imported and run under this, and the one line worth it is logged here."""
    alembic_log = logging.getLogger("alembic")
    level = alembic_log.level
    alembic_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        alembic_log.setLevel(level)


def alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def current_revision(conn: sa.Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS}"
    return head


def upgrade_schema(engine: sa.Engine) -> list[str]:
    """Apply the migrations the database lacks and return their revisions, oldest first ([] when at head)."""
    with _alembic_quiet():
        return _upgrade(engine)


def _upgrade(engine: sa.Engine) -> list[str]:
    from alembic import command
    from alembic.script import ScriptDirectory

    head = head_revision()
    with engine.connect() as conn:
        if current_revision(conn) == head:  # the usual case, read without taking the lock
            return []
    config = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
        before = current_revision(conn)
        if before == head:  # another process migrated while this one waited for the lock
            return []
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    script = ScriptDirectory.from_config(config)
    applied = [rev.revision for rev in script.iterate_revisions(head, before)][::-1]
    log.info("coordination database %s: applied migrations %s", engine.url.render_as_string(hide_password=True),
             ", ".join(applied))
    return applied
