"""parkings remember when their plate was replaced by its pseudonym

Set when retention (`retention_session_plates_days`) or a driver's erasure replaced the plate
by its keyed pseudonym and dropped the driver link; the purge looks only at rows without it.

Revision ID: sessions_0003
Revises: sessions_0002
Create Date: 2026-12-10 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import shared.db

revision: str = "sessions_0003"
down_revision: str | None = "sessions_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sessions_session", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("pseudonymised_at", shared.db.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("sessions_session", schema=None) as batch_op:
        batch_op.drop_column("pseudonymised_at")
