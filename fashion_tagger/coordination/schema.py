"""The coordination tables as SQLAlchemy Core objects, for queries and for checking the migrations against.

The schema itself is created and changed only by the Alembic migrations in `migrations/versions/`; a test
compares what they build with these tables. Every name starts with `ft_`, so the tables can share a database.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

VERSION_TABLE = "ft_schema_version"  # Alembic's own table, named apart from MLflow's and Airflow's alembic_version

# One row per run; its stages are in ft_stage_states.
runs = sa.Table(
    "ft_runs", metadata,
    sa.Column("run_id", sa.String(255), primary_key=True),
    sa.Column("created", sa.String(40), nullable=True),  # ISO 8601 UTC, as state.json wrote it
)

# What `<run>/state.json` held per stage: status, attempts, who ran it, how long, and its result or error.
stage_states = sa.Table(
    "ft_stage_states", metadata,
    sa.Column("run_id", sa.String(255), sa.ForeignKey("ft_runs.run_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("stage", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("host", sa.String(255), nullable=True),
    sa.Column("seconds", sa.Float, nullable=True),
    sa.Column("result", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("started", sa.String(40), nullable=True),
    sa.Column("finished", sa.String(40), nullable=True),
)

# Named leases: held while expires_at (seconds since the epoch, by the database's clock) is in the future.
leases = sa.Table(
    "ft_leases", metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("token", sa.String(32), nullable=False),  # this acquisition: only its holder renews or releases it
    sa.Column("holder", sa.String(255), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("acquired_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

# Which part each image of a membership record is in: one row per (record, image), so the first writer wins.
test_membership = sa.Table(
    "ft_test_membership", metadata,
    sa.Column("record", sa.String(255), primary_key=True),
    sa.Column("image_sha256", sa.String(255), primary_key=True),
    sa.Column("part", sa.String(16), nullable=False),
    sa.Column("source_hash", sa.String(64), nullable=False, server_default=""),
    sa.Column("added", sa.String(40), nullable=False),
)

# Files of a home written before the database (state.json, membership parquet) already imported, by path.
legacy_imports = sa.Table(
    "ft_legacy_imports", metadata,
    sa.Column("source", sa.String(1024), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("imported", sa.String(40), nullable=False),
)
