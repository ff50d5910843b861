"""plates encrypted at rest: `plate` holds ciphertext, `plate_bidx` its blind index for look-ups;
the unmatched exit's kept event is encrypted whole

Revision ID: sessions_0002
Revises: sessions_0001
Create Date: 2026-12-02 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.pii_columns import (
    ENCRYPTED_LENGTH,
    INDEX_LENGTH,
    PiiColumn,
    PiiTable,
    decrypt_in_migration,
    encrypt_in_migration,
)

revision: str = "sessions_0002"
down_revision: str | None = "sessions_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = [
    PiiTable("sessions_session", "id", (PiiColumn("plate", "plate"),)),
    PiiTable(
        "sessions_unmatched_exit",
        "event_id",
        (PiiColumn("plate", "plate"), PiiColumn("payload", None)),
    ),
]


def upgrade() -> None:
    with op.batch_alter_table("sessions_session") as batch_op:
        batch_op.drop_index("ix_sessions_vehicle_open")
        batch_op.alter_column(
            "plate", existing_type=sa.String(16), type_=sa.String(ENCRYPTED_LENGTH)
        )
        batch_op.add_column(sa.Column("plate_bidx", sa.String(INDEX_LENGTH), nullable=True))
    with op.batch_alter_table("sessions_unmatched_exit") as batch_op:
        batch_op.drop_index("ix_sessions_unmatched_vehicle")
        batch_op.alter_column(
            "plate", existing_type=sa.String(16), type_=sa.String(ENCRYPTED_LENGTH)
        )
        batch_op.add_column(sa.Column("plate_bidx", sa.String(INDEX_LENGTH), nullable=True))

    encrypt_in_migration(op.get_bind(), TABLES)

    with op.batch_alter_table("sessions_session") as batch_op:
        batch_op.alter_column("plate_bidx", existing_type=sa.String(INDEX_LENGTH), nullable=False)
        batch_op.create_index(
            "ix_sessions_vehicle_open", ["lot_id", "plate_bidx", "plate_color", "status"]
        )
        batch_op.create_index("ix_sessions_session_plate_bidx", ["plate_bidx"])
    with op.batch_alter_table("sessions_unmatched_exit") as batch_op:
        batch_op.alter_column("plate_bidx", existing_type=sa.String(INDEX_LENGTH), nullable=False)
        batch_op.create_index(
            "ix_sessions_unmatched_vehicle", ["lot_id", "plate_bidx", "plate_color"]
        )


def downgrade() -> None:
    decrypt_in_migration(op.get_bind(), TABLES)
    with op.batch_alter_table("sessions_unmatched_exit") as batch_op:
        batch_op.drop_index("ix_sessions_unmatched_vehicle")
        batch_op.drop_column("plate_bidx")
        batch_op.alter_column(
            "plate", existing_type=sa.String(ENCRYPTED_LENGTH), type_=sa.String(16)
        )
        batch_op.create_index("ix_sessions_unmatched_vehicle", ["lot_id", "plate", "plate_color"])
    with op.batch_alter_table("sessions_session") as batch_op:
        batch_op.drop_index("ix_sessions_session_plate_bidx")
        batch_op.drop_index("ix_sessions_vehicle_open")
        batch_op.drop_column("plate_bidx")
        batch_op.alter_column(
            "plate", existing_type=sa.String(ENCRYPTED_LENGTH), type_=sa.String(16)
        )
        batch_op.create_index(
            "ix_sessions_vehicle_open", ["lot_id", "plate", "plate_color", "status"]
        )
