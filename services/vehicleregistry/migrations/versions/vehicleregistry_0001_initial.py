"""initial: the sandbox vehicle register

Revision ID: vehicleregistry_0001
Revises:
Create Date: 2026-12-02 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import shared.db

revision: str = "vehicleregistry_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "vehicleregistry_vehicle",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("plate", sa.String(length=16), nullable=False),
        sa.Column("plate_color", sa.String(length=10), nullable=False),
        sa.Column("owner_name", sa.String(length=100), nullable=False),
        sa.Column("vin", sa.String(length=17), nullable=False),
        sa.Column("registered_at", shared.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vehicleregistry_vehicle")),
        sa.UniqueConstraint("plate", "plate_color", name=op.f("uq_vehicleregistry_vehicle_plate")),
    )


def downgrade() -> None:
    op.drop_table("vehicleregistry_vehicle")
