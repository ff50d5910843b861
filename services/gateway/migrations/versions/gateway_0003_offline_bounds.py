"""eligibility snapshots as served to each car park, and offline claims not taken as stated

Revision ID: gateway_0003
Revises: gateway_0002
Create Date: 2026-11-30 05:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import shared.db

revision: str = "gateway_0003"
down_revision: str | None = "gateway_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gateway_eligibility_set",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("hashes", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", shared.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_gateway_eligibility_set")),
    )
    op.create_table(
        "gateway_eligibility_served",
        sa.Column("lot_id", sa.String(length=36), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("served_at", shared.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("superseded_at", shared.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("lot_id", "version", name=op.f("pk_gateway_eligibility_served")),
    )
    op.create_index(
        op.f("ix_gateway_eligibility_served_digest"),
        "gateway_eligibility_served",
        ["digest"],
        unique=False,
    )
    op.create_index(
        op.f("ix_gateway_eligibility_served_superseded_at"),
        "gateway_eligibility_served",
        ["superseded_at"],
        unique=False,
    )
    op.create_table(
        "gateway_offline_claim",
        sa.Column("lot_id", sa.String(length=36), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("lot_code", sa.String(length=64), nullable=False),
        sa.Column("plate", sa.String(length=32), nullable=False),
        sa.Column("plate_color", sa.String(length=16), nullable=False),
        sa.Column("claimed_decision", sa.String(length=20), nullable=False),
        sa.Column("eligibility_version", sa.BigInteger(), nullable=True),
        sa.Column("decided_at", shared.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("decision", sa.String(length=20), nullable=False),
        sa.Column("driver_id", sa.String(length=36), nullable=True),
        sa.Column("recorded_at", shared.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("lot_id", "event_id", name=op.f("pk_gateway_offline_claim")),
    )
    op.create_index(
        op.f("ix_gateway_offline_claim_recorded_at"),
        "gateway_offline_claim",
        ["recorded_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_gateway_offline_claim_recorded_at"), table_name="gateway_offline_claim")
    op.drop_table("gateway_offline_claim")
    op.drop_index(
        op.f("ix_gateway_eligibility_served_superseded_at"),
        table_name="gateway_eligibility_served",
    )
    op.drop_index(
        op.f("ix_gateway_eligibility_served_digest"), table_name="gateway_eligibility_served"
    )
    op.drop_table("gateway_eligibility_served")
    op.drop_table("gateway_eligibility_set")
