"""dead letters say why and whether they were replayed

Revision ID: bus_0002
Revises: bus_0001
Create Date: 2026-11-30 02:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import shared.db

revision: str = "bus_0002"
down_revision: str | None = "bus_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("bus_dead_letter", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("reason", sa.String(length=20), server_default="bad_data", nullable=False)
        )
        batch_op.add_column(sa.Column("key", sa.String(length=200), nullable=True))
        batch_op.add_column(
            sa.Column("replayed_at", shared.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.create_index("ix_bus_dead_letter_open", ["replayed_at", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("bus_dead_letter", schema=None) as batch_op:
        batch_op.drop_index("ix_bus_dead_letter_open")
        batch_op.drop_column("replayed_at")
        batch_op.drop_column("key")
        batch_op.drop_column("reason")
