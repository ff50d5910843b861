"""eligibility snapshots served remember how their vehicles were hashed (per-lot salted scrypt)

Revision ID: gateway_0004
Revises: gateway_0003
Create Date: 2026-12-02 05:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "gateway_0004"
down_revision: str | None = "gateway_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows already there were sha256 snapshots: NULL says so.
    op.add_column(
        "gateway_eligibility_served", sa.Column("kdf", sa.String(length=160), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("gateway_eligibility_served", "kdf")
