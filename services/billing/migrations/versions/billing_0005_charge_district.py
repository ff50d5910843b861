"""charges carry their district

Revision ID: billing_0005
Revises: billing_0004
Create Date: 2026-11-25 16:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "billing_0005"
down_revision: str | None = "billing_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: charges opened before this revision do not know their district (billing never
    # held the registry); they stay in the city's totals and out of the per-district figures.
    with op.batch_alter_table("billing_charge", schema=None) as batch_op:
        batch_op.add_column(sa.Column("district", sa.String(length=40), nullable=True))
        batch_op.create_index("ix_billing_charge_district", ["district", "status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("billing_charge", schema=None) as batch_op:
        batch_op.drop_index("ix_billing_charge_district")
        batch_op.drop_column("district")
