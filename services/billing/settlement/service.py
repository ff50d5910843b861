"""Daily settlement: for one Asia/Shanghai business day, per operator,
captured − refunded − commission, derived from the ledger's entries of that day.

A run is frozen: running it again answers the stored result. Each operator's payout is booked
as a `settlement` journal (payable and refunds closed against provider clearing), so settled
days leave the operator's accounts at zero. Only finished days can be run: money the provider
still moves today would otherwise be missed.

Money is never lost between days. A capture or refund can be booked to a day after that day
was settled (an `unknown` charge the provider resolves late, a refund the provider dates
back); such a journal is taken by the next run, of whatever day, as an adjustment that names
its own day and reference. Every capture and refund journal a run pays becomes a
`SettlementItem` keyed by the journal, inserted with ON CONFLICT DO NOTHING: of two runs racing
for the same late journal exactly one inserts it, and each run pays only what it inserted.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta
from typing import Any, Literal

import structlog
from sqlalchemy import exists, select, union_all
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.billing.ledger import service as ledger
from services.billing.ledger.models import Journal, LedgerEntry
from services.billing.settlement.models import Settlement, SettlementItem, SettlementRun
from services.billing.settlement.schemas import Adjustment, OperatorSettlement, SettlementDay
from shared.errors import problem
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)

DayOpen = problem(409, "settlement_day_open", "The day is not over in Asia/Shanghai yet")
NotRun = problem(404, "settlement_not_run", "No settlement was run for this day")
CSV_COLUMNS = [
    "date",
    "operator_id",
    "captured_fen",
    "refunded_fen",
    "commission_fen",
    "payable_fen",
    "line",  # day (the day's own money), adjustment (an earlier day's), payout (the sum)
    "original_date",
    "kind",
    "reference",
]
# A journal is stamped when written but seen by a run only once committed; booking
# transactions last well under this, so what was written this long before a run began was
# visible to it. `ledger check` names any journal the rule would leave unpaid.
LATE_GRACE = timedelta(minutes=10)
# Rows per statement: SQLite allows 32 766 bound parameters, an item row takes 9.
BATCH = 500
ADJUSTMENT_KIND: dict[str, Literal["capture", "refund"]] = {
    ledger.JournalKind.charge_captured: "capture",
    ledger.JournalKind.refund: "refund",
}


def _insert(db: Session) -> Any:
    dialect = db.get_bind().dialect.name
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def _claim(db: Session, day: date) -> bool:
    """Insert the run row; False when the day already had one. A concurrent run waits on the
    insert until the first commits, then sees it."""
    now = utcnow()
    stmt = (
        _insert(db)(SettlementRun)
        .values(business_date=day, created_at=now, late_from=now - LATE_GRACE)
        .on_conflict_do_nothing()
        .returning(SettlementRun.business_date)
    )
    return db.execute(stmt).scalar() is not None


def _batches(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), BATCH):
        yield values[start : start + BATCH]


def _candidates(db: Session, day: date) -> list[tuple[str, date, str, str]]:
    """Capture and refund journals no settlement has paid yet: this day's, and those booked
    to an already settled day since that day's run (the late ones). Both are read by
    `ix_billing_journal_day`, so a run reads its day and the late tails, not the whole ledger.
    In id order: racing runs insert the items they share in one order and never deadlock."""
    unpaid = ~exists().where(SettlementItem.journal_id == Journal.id)
    columns = (Journal.id, Journal.business_date, Journal.kind, Journal.ref_id)
    own = select(*columns).where(
        Journal.business_date == day, Journal.kind.in_(ledger.SETTLED_KINDS), unpaid
    )
    late = (
        select(*columns)
        .join(SettlementRun, SettlementRun.business_date == Journal.business_date)
        .where(
            Journal.business_date != day,
            Journal.created_at >= SettlementRun.late_from,
            Journal.kind.in_(ledger.SETTLED_KINDS),
            unpaid,
        )
    )
    rows = db.execute(union_all(own, late)).all()
    return sorted((r[0], r[1], r[2], r[3]) for r in rows)


def _claim_items(db: Session, day: date) -> tuple[list[SettlementItem], dict[str, str]]:
    """Take every unpaid journal this run may pay; returns the items this run inserted and,
    per operator, the provider clearing account its payout leaves from."""
    candidates = _candidates(db, day)
    claimed: list[SettlementItem] = []
    clearing: dict[str, str] = {}
    for batch in _batches(candidates):
        lines: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for journal_id, account, amount in db.execute(
            select(LedgerEntry.journal_id, LedgerEntry.account, LedgerEntry.amount_fen).where(
                LedgerEntry.journal_id.in_([c[0] for c in batch])
            )
        ):
            lines[journal_id].append((account, int(amount)))
        rows: list[dict[str, Any]] = []
        accounts: dict[str, str | None] = {}
        for journal_id, business_date, kind, ref_id in batch:
            money = ledger.journal_money(kind, lines[journal_id])
            if money.operator_id is None:
                # No operator account: nothing to pay anyone. `ledger check` names it.
                log.warning("settlement.journal_without_operator", journal_id=journal_id)
                continue
            accounts[journal_id] = money.clearing_account
            rows.append(
                {
                    "journal_id": journal_id,
                    "settlement_date": day,
                    "operator_id": money.operator_id,
                    "business_date": business_date,
                    "kind": kind,
                    "reference": ref_id,
                    "captured_fen": money.captured_fen,
                    "refunded_fen": money.refunded_fen,
                    "commission_fen": money.commission_fen,
                }
            )
        if not rows:
            continue
        inserted = set(
            db.scalars(
                _insert(db)(SettlementItem)
                .values(rows)
                .on_conflict_do_nothing()
                .returning(SettlementItem.journal_id)
            )
        )
        for row in rows:
            if row["journal_id"] not in inserted:
                continue  # a racing run of another day paid it
            claimed.append(SettlementItem(**row))
            source = accounts[row["journal_id"]]
            if source is not None:
                op = row["operator_id"]
                clearing[op] = min(clearing.get(op, source), source)
    return claimed, clearing


def _adjustment(item: SettlementItem) -> Adjustment:
    return Adjustment(
        date=item.business_date,
        kind=ADJUSTMENT_KIND[item.kind],
        reference=item.reference,
        captured_fen=item.captured_fen,
        refunded_fen=item.refunded_fen,
        commission_fen=item.commission_fen,
        payable_fen=item.payable_fen,
    )


def stored(db: Session, day: date) -> SettlementDay | None:
    if db.get(SettlementRun, day) is None:
        return None
    rows = db.scalars(
        select(Settlement).where(Settlement.business_date == day).order_by(Settlement.operator_id)
    )
    adjustments: dict[str, list[Adjustment]] = defaultdict(list)
    for item in db.scalars(
        select(SettlementItem)
        .where(SettlementItem.settlement_date == day, SettlementItem.business_date != day)
        .order_by(SettlementItem.business_date, SettlementItem.kind, SettlementItem.reference)
    ):
        adjustments[item.operator_id].append(_adjustment(item))
    result: list[OperatorSettlement] = []
    for row in rows:
        mine = adjustments[row.operator_id]
        extra = sum(a.payable_fen for a in mine)
        result.append(
            OperatorSettlement(
                operator_id=row.operator_id,
                captured_fen=row.captured_fen,
                refunded_fen=row.refunded_fen,
                commission_fen=row.commission_fen,
                payable_fen=row.payable_fen,
                adjustments=mine,
                adjustments_fen=extra,
                payout_fen=row.payable_fen + extra,
            )
        )
    return SettlementDay(date=day, settlements=result)


def run(db: Session, day: date, now: datetime | None = None) -> tuple[bool, SettlementDay]:
    """(created, result). The second run of a day returns the first one's result unchanged."""
    existing = stored(db, day)
    if existing is not None:
        return False, existing
    if day >= ledger.business_date(now or utcnow()):
        raise DayOpen(f"{day} is not over yet in Asia/Shanghai")
    if not _claim(db, day):
        result = stored(db, day)
        assert result is not None
        return False, result
    items, clearing = _claim_items(db, day)
    per_operator: dict[str, list[SettlementItem]] = defaultdict(list)
    for item in items:
        per_operator[item.operator_id].append(item)
    for operator_id, mine in sorted(per_operator.items()):
        own = [i for i in mine if i.business_date == day]
        captured = sum(i.captured_fen for i in own)
        refunded = sum(i.refunded_fen for i in own)
        fee = sum(i.commission_fen for i in own)
        db.add(
            Settlement(
                business_date=day,
                operator_id=operator_id,
                captured_fen=captured,
                refunded_fen=refunded,
                commission_fen=fee,
                payable_fen=captured - refunded - fee,
            )
        )
        # The payout closes everything this run pays, the adjustments included.
        payout = sum(i.payable_fen for i in mine)
        refunded_all = sum(i.refunded_fen for i in mine)
        ledger.post(
            db,
            kind=ledger.JournalKind.settlement,
            ref_type="settlement",
            ref_id=f"{day.isoformat()}:{operator_id}",
            at=utcnow(),
            day=day,
            lines=[
                (ledger.operator_payable(operator_id), payout + refunded_all),
                (ledger.refunds(operator_id), -refunded_all),
                (clearing.get(operator_id, ledger.provider_clearing("sandbox")), -payout),
            ],
        )
    db.flush()
    result = stored(db, day)
    assert result is not None
    log.info(
        "settlement.run",
        date=day.isoformat(),
        operators=len(result.settlements),
        adjustments=sum(len(s.adjustments) for s in result.settlements),
    )
    return True, result


def to_csv(result: SettlementDay) -> str:
    """Per operator: the day's row, one row per adjustment (with its own day and reference),
    and the payout row that sums them."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    day = result.date.isoformat()
    for s in result.settlements:
        writer.writerow(
            [
                day,
                s.operator_id,
                s.captured_fen,
                s.refunded_fen,
                s.commission_fen,
                s.payable_fen,
                "day",
                day,
                "",
                "",
            ]
        )
        for a in s.adjustments:
            writer.writerow(
                [
                    day,
                    s.operator_id,
                    a.captured_fen,
                    a.refunded_fen,
                    a.commission_fen,
                    a.payable_fen,
                    "adjustment",
                    a.date.isoformat(),
                    a.kind,
                    a.reference,
                ]
            )
        writer.writerow(
            [
                day,
                s.operator_id,
                s.captured_fen + sum(a.captured_fen for a in s.adjustments),
                s.refunded_fen + sum(a.refunded_fen for a in s.adjustments),
                s.commission_fen + sum(a.commission_fen for a in s.adjustments),
                s.payout_fen,
                "payout",
                "",
                "",
                "",
            ]
        )
    return buffer.getvalue()
