"""The coordination database: which one (`FASHION_TAGGER_DATABASE_URL`, else a SQLite file in the home), the
connection to it with its schema migrated to head, and the `Coordinator` that every table's API hangs on.
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from fashion_tagger.coordination.leases import Leases
from fashion_tagger.coordination.membership import Membership
from fashion_tagger.coordination.migrate import upgrade_schema
from fashion_tagger.coordination.sql import SUPPORTED_DIALECTS
from fashion_tagger.coordination.state import RunStates
from fashion_tagger.core.errors import ConfigError, TransientError
from fashion_tagger.core.layout import Home, is_url

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "FASHION_TAGGER_DATABASE_URL"
SQLITE_BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another one's transaction before failing


class CoordinationUnavailableError(TransientError):
    """The coordination database did not answer (down, unreachable, refusing connections): retried."""


class Coordinator(RunStates, Leases, Membership):
    """Run and stage state, leases and test-part membership in one database; make one with `connect`."""

    def __init__(self, engine: sa.Engine, *, applied_migrations: list[str] | None = None) -> None:
        super().__init__(engine)
        self.applied_migrations = applied_migrations or []

    @property
    def url(self) -> str:
        """The database's URL without its password, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()


def require_database_url(home_is_remote: bool) -> str | None:
    """FASHION_TAGGER_DATABASE_URL; an error naming it when the home is an object-store URL and it is unset
    (a SQLite file needs a local home to live in, and every machine must see the same database)."""
    url = os.environ.get(DATABASE_URL_ENV, "").strip() or None
    if home_is_remote and url is None:
        raise ConfigError(f"{DATABASE_URL_ENV} is not set, and the home is an object-store URL: set it to the "
                          "coordination database every worker shares, e.g. "
                          "postgresql://fashion_tagger:PASSWORD@db-host:5432/fashion_tagger")
    return url


def _engine(url: str) -> sa.Engine:
    try:
        parsed = sa.make_url(url)
    except ArgumentError:
        raise ConfigError(f"{DATABASE_URL_ENV}={url!r} is not a database URL: write it as "
                          "postgresql://user:password@host:5432/database or sqlite:////absolute/path.db") from None
    dialect = parsed.get_backend_name()
    if dialect not in SUPPORTED_DIALECTS:
        raise ConfigError(f"{DATABASE_URL_ENV} names a {dialect} database; coordination runs on "
                          f"{' or '.join(SUPPORTED_DIALECTS)}: point it at one of those")
    if dialect == "postgresql":
        try:
            return sa.create_engine(parsed, pool_pre_ping=True, pool_size=2, max_overflow=4)
        except NoSuchModuleError as exc:
            raise ConfigError(f"{DATABASE_URL_ENV} names the driver {parsed.drivername!r}, which SQLAlchemy does "
                              "not know: use postgresql:// or postgresql+psycopg2://") from exc
    engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    _begin_immediate(engine)
    return engine


def _begin_immediate(engine: sa.Engine) -> None:
    """Let SQLAlchemy, not the sqlite3 module, begin transactions, and begin each one IMMEDIATE: it takes the
    write lock at once (waiting up to the busy timeout), so two read-then-write transactions never deadlock."""

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA foreign_keys = ON")

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _forget_connections_after_fork(engine: sa.Engine) -> None:
    """A forked child must not use its parent's pooled connections (SQLAlchemy's advice: dispose, close=False)."""
    ref = weakref.ref(engine)

    def after_fork() -> None:
        if (alive := ref()) is not None:
            alive.dispose(close=False)

    os.register_at_fork(after_in_child=after_fork)


def connect(url: str | None, home: Path | str) -> Coordinator:
    """The coordination database at URL, else FASHION_TAGGER_DATABASE_URL, else `<home>/coordination.db`
    (created), with its schema migrated to the newest revision shipped in the package. A HOME that is an
    object-store URL (`s3://bucket/prefix`) has no SQLite file: it needs one of the first two."""
    url = url or require_database_url(home_is_remote=is_url(home))
    if url is None:
        path = Home(Path(home)).coordination_db
        path.parent.mkdir(parents=True, exist_ok=True)
        url = sa.URL.create("sqlite", database=str(path.resolve())).render_as_string()
    engine = _engine(url)
    try:
        applied = upgrade_schema(engine)
    except OperationalError as exc:
        engine.dispose()
        where = engine.url.render_as_string(hide_password=True)
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise CoordinationUnavailableError(f"the coordination database {where} did not answer ({reason}): check "
                                           f"{DATABASE_URL_ENV} and that the server is up") from exc
    _forget_connections_after_fork(engine)
    return Coordinator(engine, applied_migrations=applied)
