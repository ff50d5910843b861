"""The settlement half of the ledger check: every captured charge and every succeeded refund
is paid by exactly one settlement, or is still waiting for the run that will pay it.

Proved from three sides that must agree: the charges and refunds (each has its journal), the
settlement items (each capture or refund journal is in one settlement at most, by its primary
key, and a journal in none must still be waiting), and the money (each settlement's stored
figures and its payout journal equal the entries of the journals it lists).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from sqlalchemy import case, exists, func, select
from sqlalchemy.orm import Session

from services.billing.charge.models import Charge, ChargeStatus
from services.billing.ledger import service as ledger
from services.billing.ledger.models import Journal, LedgerEntry
from services.billing.refund.models import Refund, RefundStatus
from services.billing.settlement.models import Settlement, SettlementItem, SettlementRun
from services.billing.settlement.service import LATE_GRACE

MAX_LISTED = 50  # problems listed by name; all of them are counted


@dataclass
class SettlementCoverage:
    settled_items: int = 0  # capture and refund journals paid by a settlement
    awaiting_first_run: int = 0  # of a day not settled yet
    awaiting_adjustment: int = 0  # booked to a settled day, for the next run to carry
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def add(self, problem: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append(problem)

    def report(self) -> dict[str, Any]:
        return {
            "included_once": self.ok,
            "settled_items": self.settled_items,
            "awaiting_first_run": self.awaiting_first_run,
            "awaiting_adjustment": self.awaiting_adjustment,
            "problem_count": self.problem_count,
            "problems": self.problems,
        }


Figures = tuple[int, int, int]  # captured, refunded, commission


def check_settlements(db: Session) -> SettlementCoverage:
    result = SettlementCoverage()
    _journals_exist(db, result)
    runs = {r.business_date: r for r in db.scalars(select(SettlementRun))}
    _unpaid(db, runs, result)
    _figures(db, set(runs), result)
    return result


def _journals_exist(db: Session, result: SettlementCoverage) -> None:
    """Money the provider moved that the ledger (and so every settlement) does not know."""
    for charge_id in db.scalars(
        select(Charge.id).where(
            Charge.status == ChargeStatus.captured,
            ~exists().where(
                Journal.kind == ledger.JournalKind.charge_captured,
                Journal.ref_type == "charge",
                Journal.ref_id == Charge.id,
            ),
        )
    ):
        result.add(f"charge {charge_id} is captured but has no capture journal")
    for refund_id in db.scalars(
        select(Refund.id).where(
            Refund.status == RefundStatus.succeeded,
            ~exists().where(
                Journal.kind == ledger.JournalKind.refund,
                Journal.ref_type == "refund",
                Journal.ref_id == Refund.id,
            ),
        )
    ):
        result.add(f"refund {refund_id} succeeded but has no refund journal")


def _unpaid(db: Session, runs: dict[date, SettlementRun], result: SettlementCoverage) -> None:
    """A journal no settlement paid is fine while its day has not been run, or while no run
    has begun since it was booked to a settled day; else a run passed it over (or, written
    before its day's run, no run will ever take it)."""
    latest = max((r.created_at for r in runs.values()), default=None)
    result.settled_items = db.scalar(select(func.count()).select_from(SettlementItem)) or 0
    for kind, ref_id, day, created_at in db.execute(
        select(Journal.kind, Journal.ref_id, Journal.business_date, Journal.created_at)
        .where(
            Journal.kind.in_(ledger.SETTLED_KINDS),
            ~exists().where(SettlementItem.journal_id == Journal.id),
        )
        .order_by(Journal.business_date, Journal.id)
    ):
        day_run = runs.get(day)
        if day_run is None:
            result.awaiting_first_run += 1
        elif created_at < day_run.late_from:
            result.add(
                f"{kind} {ref_id} of {day} was written before that day's run, yet no "
                "settlement paid it and none will"
            )
        elif latest is not None and latest > max(created_at, day_run.created_at) + LATE_GRACE:
            result.add(
                f"{kind} {ref_id} of {day} (settled) was left out of the run of "
                f"{latest.isoformat()}, which should have carried it as an adjustment"
            )
        else:
            result.awaiting_adjustment += 1


def _figures(db: Session, runs: set[date], result: SettlementCoverage) -> None:
    """Per settlement: stored figures = its items = the entries of its journals, and its
    payout journal pays exactly that."""
    own = case((SettlementItem.business_date == SettlementItem.settlement_date, 1), else_=0)
    key = (SettlementItem.settlement_date, SettlementItem.operator_id, own)
    from_entries: dict[tuple[date, str, int], list[int]] = defaultdict(lambda: [0, 0, 0])
    for settled, operator, is_own, kind, account, total in db.execute(
        select(*key, Journal.kind, LedgerEntry.account, func.sum(LedgerEntry.amount_fen))
        .join(Journal, Journal.id == SettlementItem.journal_id)
        .join(LedgerEntry, LedgerEntry.journal_id == Journal.id)
        .group_by(*key, Journal.kind, LedgerEntry.account)
    ):
        money = ledger.journal_money(kind, [(account, int(total))])
        figures = from_entries[(settled, operator, int(is_own))]
        figures[0] += money.captured_fen
        figures[1] += money.refunded_fen
        figures[2] += money.commission_fen
    from_items: dict[tuple[date, str, int], Figures] = {
        (settled, operator, int(is_own)): (int(c), int(r), int(f))
        for settled, operator, is_own, c, r, f in db.execute(
            select(
                *key,
                func.sum(SettlementItem.captured_fen),
                func.sum(SettlementItem.refunded_fen),
                func.sum(SettlementItem.commission_fen),
            ).group_by(*key)
        )
    }
    for k in sorted(set(from_entries) | set(from_items)):
        entries, items = tuple(from_entries.get(k, [0, 0, 0])), from_items.get(k, (0, 0, 0))
        if entries != items:
            result.add(
                f"settlement {k[0]}/{k[1]}: its items say {items}, their journals say {entries}"
            )
    stored: dict[tuple[date, str], Figures] = {}
    for s in db.scalars(select(Settlement)):
        stored[(s.business_date, s.operator_id)] = (
            s.captured_fen,
            s.refunded_fen,
            s.commission_fen,
        )
        if s.payable_fen != s.captured_fen - s.refunded_fen - s.commission_fen:
            result.add(f"settlement {s.business_date}/{s.operator_id}: payable is not the rest")
    payouts: dict[tuple[date, str], dict[str, int]] = defaultdict(dict)
    for ref_id, account, amount in db.execute(
        select(Journal.ref_id, LedgerEntry.account, LedgerEntry.amount_fen)
        .join(LedgerEntry, LedgerEntry.journal_id == Journal.id)
        .where(Journal.kind == ledger.JournalKind.settlement)
    ):
        day, _, operator = ref_id.partition(":")
        lines = payouts[(date.fromisoformat(day), operator)]
        prefix = account.rsplit(":", 1)[0]
        lines[prefix] = lines.get(prefix, 0) + int(amount)
    zero = (0, 0, 0)
    for d, operator in sorted({(d, o) for d, o, _ in from_items} | set(stored)):
        name = f"settlement {d}/{operator}"
        if d not in runs:
            result.add(f"{name} exists but its day has no run")
        day_items = from_items.get((d, operator, 1), zero)
        if (d, operator) not in stored:
            result.add(f"{name} pays items but has no stored settlement")
        elif stored[(d, operator)] != day_items:
            result.add(f"{name}: stored {stored[(d, operator)]}, its day's items {day_items}")
        late = from_items.get((d, operator, 0), zero)
        captured, refunded, fee = (day_items[i] + late[i] for i in range(3))
        owed = (captured - fee, refunded)  # the payable's debit and the refunds' credit
        lines = payouts.get((d, operator), {})
        paid = (lines.get("liability:operator_payable", 0), -lines.get("contra:refunds", 0))
        if paid != owed:
            result.add(f"{name}: its payout journal closes {paid}, its items owe {owed}")
