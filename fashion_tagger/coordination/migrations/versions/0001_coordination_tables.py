"""The first coordination schema: runs and their stages' states, leases, test-part membership, legacy imports.

Frozen as written: a later change of `schema.py` gets a migration of its own (0002_..., down_revision "0001").
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None


def upgrade() -> None:
    op.create_table(
        "ft_runs",
        sa.Column("run_id", sa.String(255), primary_key=True),
        sa.Column("created", sa.String(40), nullable=True),
    )
    op.create_table(
        "ft_stage_states",
        sa.Column("run_id", sa.String(255), sa.ForeignKey("ft_runs.run_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("stage", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("seconds", sa.Float, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("started", sa.String(40), nullable=True),
        sa.Column("finished", sa.String(40), nullable=True),
    )
    op.create_table(
        "ft_leases",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("token", sa.String(32), nullable=False),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("acquired_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_table(
        "ft_test_membership",
        sa.Column("record", sa.String(255), primary_key=True),
        sa.Column("image_sha256", sa.String(255), primary_key=True),
        sa.Column("part", sa.String(16), nullable=False),
        sa.Column("source_hash", sa.String(64), nullable=False, server_default=""),
        sa.Column("added", sa.String(40), nullable=False),
    )
    op.create_table(
        "ft_legacy_imports",
        sa.Column("source", sa.String(1024), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("imported", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    for table in ("ft_legacy_imports", "ft_test_membership", "ft_leases", "ft_stage_states", "ft_runs"):
        op.drop_table(table)
