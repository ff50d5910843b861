"""Daily settlement: for one Asia/Shanghai business day, per operator,
captured − refunded − commission, derived from the ledger's entries of that day.

A run is frozen: running it again answers the stored result. Each operator's payout is booked
as a `settlement` journal (payable and refunds closed against provider clearing), so settled
days leave the operator's accounts at zero. Only finished days can be run: money the provider
still moves today would otherwise be missed.
"""

from __future__ import annotations

import csv
import io
from datetime import date, datetime

import structlog
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.billing.ledger import service as ledger
from services.billing.ledger.models import Journal, LedgerEntry
from services.billing.settlement.models import Settlement, SettlementRun
from services.billing.settlement.schemas import OperatorSettlement, SettlementDay
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
]


def _claim(db: Session, day: date) -> bool:
    """Insert the run row; False when the day already had one. A concurrent run waits on the
    insert until the first commits, then sees it."""
    dialect = db.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(SettlementRun)
        .values(business_date=day, created_at=utcnow())
        .on_conflict_do_nothing()
        .returning(SettlementRun.business_date)
    )
    return db.execute(stmt).scalar() is not None


def _clearing_account(db: Session, day: date, operator_id: str) -> str:
    accounts = sorted(
        db.scalars(
            select(LedgerEntry.account)
            .join(Journal, Journal.id == LedgerEntry.journal_id)
            .where(
                Journal.business_date == day,
                Journal.kind.in_([ledger.JournalKind.charge_captured, ledger.JournalKind.refund]),
                LedgerEntry.account.like("asset:provider_clearing:%"),
                Journal.id.in_(
                    select(LedgerEntry.journal_id).where(
                        LedgerEntry.account == ledger.operator_payable(operator_id)
                    )
                ),
            )
            .distinct()
        )
    )
    return accounts[0] if accounts else ledger.provider_clearing("sandbox")


def stored(db: Session, day: date) -> SettlementDay | None:
    if db.get(SettlementRun, day) is None:
        return None
    rows = db.scalars(
        select(Settlement).where(Settlement.business_date == day).order_by(Settlement.operator_id)
    )
    return SettlementDay(
        date=day,
        settlements=[OperatorSettlement.model_validate(r, from_attributes=True) for r in rows],
    )


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
    for od in ledger.operator_days(db, day):
        db.add(
            Settlement(
                business_date=day,
                operator_id=od.operator_id,
                captured_fen=od.captured_fen,
                refunded_fen=od.refunded_fen,
                commission_fen=od.commission_fen,
                payable_fen=od.payable_fen,
            )
        )
        owed = od.payable_fen + od.refunded_fen  # the operator payable's credit of the day
        ledger.post(
            db,
            kind=ledger.JournalKind.settlement,
            ref_type="settlement",
            ref_id=f"{day.isoformat()}:{od.operator_id}",
            at=utcnow(),
            day=day,
            lines=[
                (ledger.operator_payable(od.operator_id), owed),
                (ledger.refunds(od.operator_id), -od.refunded_fen),
                (_clearing_account(db, day, od.operator_id), -od.payable_fen),
            ],
        )
    db.flush()
    result = stored(db, day)
    assert result is not None
    log.info("settlement.run", date=day.isoformat(), operators=len(result.settlements))
    return True, result


def to_csv(result: SettlementDay) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for s in result.settlements:
        writer.writerow(
            [
                result.date.isoformat(),
                s.operator_id,
                s.captured_fen,
                s.refunded_fen,
                s.commission_fen,
                s.payable_fen,
            ]
        )
    return buffer.getvalue()
