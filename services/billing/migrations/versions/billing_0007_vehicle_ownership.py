"""vehicles carry proof of ownership: status, verified_at, superseded_at

Several drivers may now claim a plate (unverified); at most one holds it verified. Existing
vehicles were never proven, so they start `unverified` (the demo seeding verifies its own
drivers). Their drivers' gate snapshot version is bumped so that `citypark gate rebuild`
after this upgrade replaces what the gateway holds with the unverified state.

Revision ID: billing_0007
Revises: billing_0006
Create Date: 2026-12-02 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import shared.db

revision: str = "billing_0007"
down_revision: str | None = "billing_0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("billing_vehicle", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("status", sa.String(length=12), nullable=False, server_default="unverified")
        )
        batch_op.add_column(
            sa.Column("verified_at", shared.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("superseded_at", shared.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.drop_constraint("uq_billing_vehicle_plate", type_="unique")
        batch_op.create_unique_constraint(
            "uq_billing_vehicle_driver_id", ["driver_id", "plate", "plate_color"]
        )
        batch_op.create_index("ix_billing_vehicle_plate", ["plate", "plate_color"], unique=False)
    with op.batch_alter_table("billing_vehicle", schema=None) as batch_op:
        batch_op.alter_column("status", server_default=None)
    op.execute(
        "UPDATE billing_driver SET state_version = state_version + 1"
        " WHERE id IN (SELECT driver_id FROM billing_vehicle)"
    )


def downgrade() -> None:
    # Only one claim per plate fits the old schema: the verified one, else the oldest.
    rank = "CASE WHEN {0}.status = 'verified' THEN 0 ELSE 1 END"
    v, w = rank.format("v"), rank.format("w")
    op.execute(
        "DELETE FROM billing_vehicle WHERE id IN (SELECT v.id FROM billing_vehicle v WHERE EXISTS"
        " (SELECT 1 FROM billing_vehicle w WHERE w.plate = v.plate"
        f" AND w.plate_color = v.plate_color AND w.id <> v.id AND ({w} < {v} OR {w} = {v}"
        " AND (w.created_at < v.created_at OR w.created_at = v.created_at AND w.id < v.id))))"
    )
    with op.batch_alter_table("billing_vehicle", schema=None) as batch_op:
        batch_op.drop_index("ix_billing_vehicle_plate")
        batch_op.drop_constraint("uq_billing_vehicle_driver_id", type_="unique")
        batch_op.create_unique_constraint("uq_billing_vehicle_plate", ["plate", "plate_color"])
        batch_op.drop_column("superseded_at")
        batch_op.drop_column("verified_at")
        batch_op.drop_column("status")
