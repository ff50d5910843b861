"""district keys can be revoked; the audit log names the service and the reason given

Revision ID: lots_0004
Revises: lots_0003
Create Date: 2026-11-30 04:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import shared.db

revision: str = "lots_0004"
down_revision: str | None = "lots_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("lots_district_key") as batch_op:
        batch_op.add_column(
            sa.Column("revoked_at", shared.db.UTCDateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("lots_audit") as batch_op:
        batch_op.add_column(
            sa.Column("service", sa.String(length=20), nullable=False, server_default="lots")
        )
        batch_op.add_column(sa.Column("reason", sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column("event_id", sa.String(length=64), nullable=True))
        batch_op.create_index("ux_lots_audit_event_id", ["event_id"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("lots_audit") as batch_op:
        batch_op.drop_index("ux_lots_audit_event_id")
        batch_op.drop_column("event_id")
        batch_op.drop_column("reason")
        batch_op.drop_column("service")
    with op.batch_alter_table("lots_district_key") as batch_op:
        batch_op.drop_column("revoked_at")
