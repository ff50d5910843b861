"""drivers' rights: a per-driver token cut-off and the time a driver was erased

`tokens_valid_after` refuses every driver token issued up to it ("log out everywhere", account
deletion); `erased_at` marks a driver whose personal data was erased (money records stay,
under the driver's random id only).

Revision ID: billing_0008
Revises: billing_0007
Create Date: 2026-12-10 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import shared.db

revision: str = "billing_0008"
down_revision: str | None = "billing_0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("billing_driver", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tokens_valid_after", shared.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("erased_at", shared.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.create_index(
            "ix_billing_driver_tokens_valid_after", ["tokens_valid_after"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("billing_driver", schema=None) as batch_op:
        batch_op.drop_index("ix_billing_driver_tokens_valid_after")
        batch_op.drop_column("erased_at")
        batch_op.drop_column("tokens_valid_after")
