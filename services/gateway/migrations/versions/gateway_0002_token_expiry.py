"""admin tokens expire and carry the name of who holds them

Revision ID: gateway_0002
Revises: gateway_0001
Create Date: 2026-11-30 04:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import shared.db

revision: str = "gateway_0002"
down_revision: str | None = "gateway_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("gateway_admin_token") as batch_op:
        batch_op.add_column(
            sa.Column("expires_at", shared.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("name", sa.String(length=200), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("gateway_admin_token") as batch_op:
        batch_op.drop_column("name")
        batch_op.drop_column("expires_at")
