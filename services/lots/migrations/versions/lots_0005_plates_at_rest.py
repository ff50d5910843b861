"""passes' plates encrypted at rest: `plate` holds ciphertext, `plate_bidx` its blind index

Revision ID: lots_0005
Revises: lots_0004
Create Date: 2026-12-02 09:10:00
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

revision: str = "lots_0005"
down_revision: str | None = "lots_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = [PiiTable("lots_pass", ("lot_id", "pass_id"), (PiiColumn("plate", "plate"),))]


def upgrade() -> None:
    with op.batch_alter_table("lots_pass") as batch_op:
        batch_op.drop_index("ix_lots_pass_vehicle")
        batch_op.alter_column(
            "plate", existing_type=sa.String(32), type_=sa.String(ENCRYPTED_LENGTH)
        )
        batch_op.add_column(sa.Column("plate_bidx", sa.String(INDEX_LENGTH), nullable=True))

    encrypt_in_migration(op.get_bind(), TABLES)

    with op.batch_alter_table("lots_pass") as batch_op:
        batch_op.alter_column("plate_bidx", existing_type=sa.String(INDEX_LENGTH), nullable=False)
        batch_op.create_index("ix_lots_pass_vehicle", ["plate_bidx", "plate_color"])


def downgrade() -> None:
    decrypt_in_migration(op.get_bind(), TABLES)
    with op.batch_alter_table("lots_pass") as batch_op:
        batch_op.drop_index("ix_lots_pass_vehicle")
        batch_op.drop_column("plate_bidx")
        batch_op.alter_column(
            "plate", existing_type=sa.String(ENCRYPTED_LENGTH), type_=sa.String(32)
        )
        batch_op.create_index("ix_lots_pass_vehicle", ["plate", "plate_color"])
