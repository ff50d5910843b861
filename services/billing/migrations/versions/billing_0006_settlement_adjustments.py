"""settlements record the journals they paid; late money becomes an adjustment

Revision ID: billing_0006
Revises: billing_0005
Create Date: 2026-11-30 02:00:00.000000
"""

from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from alembic import op

import shared.db

revision: str = "billing_0006"
down_revision: str | None = "billing_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Journals written this long before a run were visible to it (the settlement's rule).
LATE_GRACE = timedelta(minutes=10)


def upgrade() -> None:
    op.create_table(
        "billing_settlement_item",
        sa.Column("journal_id", sa.String(length=36), nullable=False),
        sa.Column("settlement_date", sa.Date(), nullable=False),
        sa.Column("operator_id", sa.String(length=36), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("reference", sa.String(length=100), nullable=False),
        sa.Column("captured_fen", sa.BigInteger(), nullable=False),
        sa.Column("refunded_fen", sa.BigInteger(), nullable=False),
        sa.Column("commission_fen", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["journal_id"],
            ["billing_journal.id"],
            name=op.f("fk_billing_settlement_item_journal_id_billing_journal"),
        ),
        sa.PrimaryKeyConstraint("journal_id", name=op.f("pk_billing_settlement_item")),
    )
    with op.batch_alter_table("billing_settlement_item", schema=None) as batch_op:
        batch_op.create_index(
            "ix_billing_settlement_item_settlement",
            ["settlement_date", "operator_id"],
            unique=False,
        )
    with op.batch_alter_table("billing_journal", schema=None) as batch_op:
        batch_op.create_index(
            "ix_billing_journal_day", ["business_date", "created_at"], unique=False
        )
    with op.batch_alter_table("billing_settlement_run", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("late_from", shared.db.UTCDateTime(timezone=True), nullable=True)
        )
    runs = sa.table(
        "billing_settlement_run",
        sa.column("business_date", sa.Date()),
        sa.column("created_at", shared.db.UTCDateTime()),
        sa.column("late_from", shared.db.UTCDateTime()),
    )
    bind = op.get_bind()
    for day, created_at in bind.execute(sa.select(runs.c.business_date, runs.c.created_at)).all():
        bind.execute(
            runs.update()
            .where(runs.c.business_date == day)
            .values(late_from=created_at - LATE_GRACE)
        )
    with op.batch_alter_table("billing_settlement_run", schema=None) as batch_op:
        batch_op.alter_column(
            "late_from", existing_type=shared.db.UTCDateTime(timezone=True), nullable=False
        )
    _backfill()


def _money(kind: str, lines: list[tuple[str, int]]) -> tuple[str | None, int, int, int]:
    """(operator, captured, refunded, commission) of one journal, by the settlement's rules
    as they stand at this revision (a copy: migrations never import application code)."""
    operator: str | None = None
    captured = refunded = fee = 0
    for account, amount in lines:
        prefix, _, party = account.rpartition(":")
        if prefix == "liability:operator_payable" and kind == "charge_captured":
            captured -= amount
        elif prefix == "revenue:city_commission":
            fee -= amount
            if kind == "charge_captured":
                captured -= amount
        elif prefix == "contra:refunds":
            refunded += amount
        else:
            continue
        operator = party
    return operator, captured, refunded, fee


def _backfill() -> None:
    """Record what the settlements already run have paid, so none of it is paid again.

    Before this revision a run summed its day's journals as they stood when it ran; journals
    booked to the day later were never paid. Per settled day and operator, the journals the
    run saw are the oldest ones whose sums equal the stored settlement (captures and refunds
    are never zero, so at most one such prefix exists); those become the day's items and the
    rest stay unpaid, so the next run pays them as adjustments. Where no prefix matches, the
    journals booked before the run are taken, and `citypark ledger check` names the mismatch.
    """
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT count(*) FROM billing_settlement_run")).scalar() == 0:
        return
    stored = {
        (r.business_date, r.operator_id): (r.captured_fen, r.refunded_fen, r.commission_fen)
        for r in bind.execute(
            sa.text(
                "SELECT business_date, operator_id, captured_fen, refunded_fen, commission_fen"
                " FROM billing_settlement"
            )
        )
    }
    journals = bind.execute(
        sa.text(
            "SELECT j.id, j.kind, j.ref_id, j.business_date, e.account, e.amount_fen,"
            " CASE WHEN j.created_at <= r.created_at THEN 1 ELSE 0 END AS before_run"
            " FROM billing_journal j JOIN billing_ledger_entry e ON e.journal_id = j.id"
            " JOIN billing_settlement_run r ON r.business_date = j.business_date"
            " WHERE j.kind IN ('charge_captured', 'refund')"
            " ORDER BY j.created_at, j.id"
        )
    ).all()
    lines: dict[str, list[tuple[str, int]]] = defaultdict(list)
    meta: dict[str, tuple[str, str, Any, bool]] = {}
    for j in journals:
        lines[j.id].append((j.account, int(j.amount_fen)))
        meta[j.id] = (j.kind, j.ref_id, j.business_date, bool(j.before_run))
    groups: dict[tuple[Any, str], list[dict[str, Any]]] = defaultdict(list)
    for journal_id, (kind, ref_id, day, before_run) in meta.items():  # oldest first
        operator, captured, refunded, fee = _money(kind, lines[journal_id])
        if operator is None:
            continue
        groups[(day, operator)].append(
            {
                "journal_id": journal_id,
                "settlement_date": day,
                "operator_id": operator,
                "business_date": day,
                "kind": kind,
                "reference": ref_id,
                "captured_fen": captured,
                "refunded_fen": refunded,
                "commission_fen": fee,
                "_before_run": before_run,
            }
        )
    items: list[dict[str, Any]] = []
    for (day, operator), rows in groups.items():
        target = stored.get((day, operator), (0, 0, 0))
        taken: list[dict[str, Any]] | None = [] if target == (0, 0, 0) else None
        sums = [0, 0, 0]
        for n, row in enumerate(rows, start=1):
            sums[0] += row["captured_fen"]
            sums[1] += row["refunded_fen"]
            sums[2] += row["commission_fen"]
            if tuple(sums) == target:
                taken = rows[:n]
                break
        if taken is None:
            taken = [r for r in rows if r["_before_run"]]
        items.extend({k: v for k, v in r.items() if k != "_before_run"} for r in taken)
    table = sa.table(
        "billing_settlement_item",
        *(
            sa.column(name)
            for name in (
                "journal_id",
                "settlement_date",
                "operator_id",
                "business_date",
                "kind",
                "reference",
                "captured_fen",
                "refunded_fen",
                "commission_fen",
            )
        ),
    )
    for start in range(0, len(items), 500):
        op.bulk_insert(table, items[start : start + 500])


def downgrade() -> None:
    with op.batch_alter_table("billing_settlement_run", schema=None) as batch_op:
        batch_op.drop_column("late_from")
    with op.batch_alter_table("billing_journal", schema=None) as batch_op:
        batch_op.drop_index("ix_billing_journal_day")
    with op.batch_alter_table("billing_settlement_item", schema=None) as batch_op:
        batch_op.drop_index("ix_billing_settlement_item_settlement")
    op.drop_table("billing_settlement_item")
