"""phones and plates encrypted at rest: each such column holds ciphertext; phones and vehicles'
plates get a blind index (`phone_bidx`, `plate_bidx`) that carries their look-ups and uniqueness;
the sandbox SMS outbox's bodies (sign-in codes) are encrypted too

Revision ID: billing_0009
Revises: billing_0008
Create Date: 2026-12-10 10:00:00
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

revision: str = "billing_0009"
down_revision: str | None = "billing_0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PHONE = (PiiColumn("phone", "phone"),)
PLATE = (PiiColumn("plate", None),)
TABLES = [
    PiiTable("billing_driver", "id", PHONE),
    PiiTable("billing_otp", "id", PHONE),
    PiiTable("billing_sms", "id", (*PHONE, PiiColumn("body", None))),
    PiiTable("billing_vehicle", "id", (PiiColumn("plate", "plate"),)),
    PiiTable("billing_validation", "id", PLATE),
    PiiTable("billing_charge", "id", PLATE),
    PiiTable("billing_invoice_item", "id", PLATE),
]
# (table, column, length in clear)
WIDENED = [
    ("billing_driver", "phone", 20),
    ("billing_otp", "phone", 20),
    ("billing_sms", "phone", 20),
    ("billing_vehicle", "plate", 16),
    ("billing_validation", "plate", 16),
    ("billing_charge", "plate", 16),
    ("billing_invoice_item", "plate", 16),
]
INDEXED = ["billing_driver", "billing_otp", "billing_sms", "billing_vehicle"]


def _bidx(table: str) -> str:
    return "plate_bidx" if table == "billing_vehicle" else "phone_bidx"


def upgrade() -> None:
    with op.batch_alter_table("billing_driver") as batch_op:
        batch_op.drop_constraint("uq_billing_driver_phone", type_="unique")
    with op.batch_alter_table("billing_otp") as batch_op:
        batch_op.drop_index("ix_billing_otp_phone")
    with op.batch_alter_table("billing_sms") as batch_op:
        batch_op.drop_index("ix_billing_sms_phone")
        batch_op.alter_column("body", existing_type=sa.String(500), type_=sa.Text())
    with op.batch_alter_table("billing_vehicle") as batch_op:
        batch_op.drop_constraint("uq_billing_vehicle_driver_id", type_="unique")
        batch_op.drop_index("ix_billing_vehicle_plate")
    for table, name, length in WIDENED:
        with op.batch_alter_table(table) as batch_op:
            batch_op.alter_column(
                name, existing_type=sa.String(length), type_=sa.String(ENCRYPTED_LENGTH)
            )
            if table in INDEXED:
                batch_op.add_column(sa.Column(_bidx(table), sa.String(INDEX_LENGTH), nullable=True))

    encrypt_in_migration(op.get_bind(), TABLES)

    for table in INDEXED:
        with op.batch_alter_table(table) as batch_op:
            batch_op.alter_column(
                _bidx(table), existing_type=sa.String(INDEX_LENGTH), nullable=False
            )
    with op.batch_alter_table("billing_driver") as batch_op:
        batch_op.create_unique_constraint("uq_billing_driver_phone_bidx", ["phone_bidx"])
    with op.batch_alter_table("billing_otp") as batch_op:
        batch_op.create_index("ix_billing_otp_phone", ["phone_bidx", "created_at"])
    with op.batch_alter_table("billing_sms") as batch_op:
        batch_op.create_index("ix_billing_sms_phone", ["phone_bidx", "sent_at"])
    with op.batch_alter_table("billing_vehicle") as batch_op:
        batch_op.create_unique_constraint(
            "uq_billing_vehicle_driver_id", ["driver_id", "plate_bidx", "plate_color"]
        )
        batch_op.create_index("ix_billing_vehicle_plate", ["plate_bidx", "plate_color"])


def downgrade() -> None:
    decrypt_in_migration(op.get_bind(), TABLES)
    with op.batch_alter_table("billing_vehicle") as batch_op:
        batch_op.drop_index("ix_billing_vehicle_plate")
        batch_op.drop_constraint("uq_billing_vehicle_driver_id", type_="unique")
    with op.batch_alter_table("billing_sms") as batch_op:
        batch_op.drop_index("ix_billing_sms_phone")
    with op.batch_alter_table("billing_otp") as batch_op:
        batch_op.drop_index("ix_billing_otp_phone")
    with op.batch_alter_table("billing_driver") as batch_op:
        batch_op.drop_constraint("uq_billing_driver_phone_bidx", type_="unique")
    for table, name, length in WIDENED:
        with op.batch_alter_table(table) as batch_op:
            if table in INDEXED:
                batch_op.drop_column(_bidx(table))
            batch_op.alter_column(
                name, existing_type=sa.String(ENCRYPTED_LENGTH), type_=sa.String(length)
            )
    with op.batch_alter_table("billing_sms") as batch_op:
        batch_op.alter_column("body", existing_type=sa.Text(), type_=sa.String(500))
        batch_op.create_index("ix_billing_sms_phone", ["phone", "sent_at"])
    with op.batch_alter_table("billing_otp") as batch_op:
        batch_op.create_index("ix_billing_otp_phone", ["phone", "created_at"])
    with op.batch_alter_table("billing_driver") as batch_op:
        batch_op.create_unique_constraint("uq_billing_driver_phone", ["phone"])
    with op.batch_alter_table("billing_vehicle") as batch_op:
        batch_op.create_unique_constraint(
            "uq_billing_vehicle_driver_id", ["driver_id", "plate", "plate_color"]
        )
        batch_op.create_index("ix_billing_vehicle_plate", ["plate", "plate_color"])
