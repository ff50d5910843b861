"""offline claims keep the plate encrypted (they are looked up by car park and time, never by
plate, so no blind index)

Revision ID: gateway_0005
Revises: gateway_0004
Create Date: 2026-11-30 05:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.pii_columns import (
    ENCRYPTED_LENGTH,
    PiiColumn,
    PiiTable,
    decrypt_in_migration,
    encrypt_in_migration,
)

revision: str = "gateway_0005"
down_revision: str | None = "gateway_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = [PiiTable("gateway_offline_claim", ("lot_id", "event_id"), (PiiColumn("plate", None),))]


def upgrade() -> None:
    with op.batch_alter_table("gateway_offline_claim") as batch_op:
        batch_op.alter_column(
            "plate", existing_type=sa.String(32), type_=sa.String(ENCRYPTED_LENGTH)
        )
    encrypt_in_migration(op.get_bind(), TABLES)


def downgrade() -> None:
    decrypt_in_migration(op.get_bind(), TABLES)
    with op.batch_alter_table("gateway_offline_claim") as batch_op:
        batch_op.alter_column(
            "plate", existing_type=sa.String(ENCRYPTED_LENGTH), type_=sa.String(32)
        )
