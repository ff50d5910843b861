"""Journals over a small chart of accounts, and the ledger check.

Every movement of money is one balanced journal (debits positive, credits negative); balances
derive from entries, so no row — not even a busy operator's balance — is updated per charge.

Chart of accounts (one account per party where a party is involved):

| account                               | holds                                              |
|---------------------------------------|----------------------------------------------------|
| `asset:provider_clearing:<provider>`  | money the provider took for us and still holds     |
| `asset:driver_receivable:<driver>`    | arrears: what a driver owes after a decline        |
| `liability:arrears_deferred:<op>`     | the other side of arrears, not yet the operator's  |
| `liability:operator_payable:<op>`     | what we owe an operator for captured parkings      |
| `revenue:city_commission:<op>`        | the city's commission, per operator it came from   |
| `contra:refunds:<op>`                 | refunds given back on an operator's parkings       |
| `asset:merchant_receivable:<merchant>`| what a merchant owes for the validations it gave   |
| `liability:validations_deferred:<op>` | the other side: the operator's once the merchant pays |
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.billing.ledger.models import Journal, LedgerEntry
from shared.money import commission

SHANGHAI = ZoneInfo("Asia/Shanghai")


class JournalKind:
    charge_captured = "charge_captured"
    arrears_opened = "arrears_opened"
    arrears_cleared = "arrears_cleared"
    refund = "refund"
    settlement = "settlement"
    merchant_validation = "merchant_validation"


class UnbalancedJournal(ValueError):
    pass


def business_date(at: datetime) -> date:
    """Money belongs to the Asia/Shanghai day on which the provider moved it."""
    return at.astimezone(SHANGHAI).date()


def provider_clearing(provider: str) -> str:
    return f"asset:provider_clearing:{provider}"


provider_account = provider_clearing  # the name the charge path has always used


def driver_receivable(driver_id: str) -> str:
    return f"asset:driver_receivable:{driver_id}"


def arrears_deferred(operator_id: str) -> str:
    return f"liability:arrears_deferred:{operator_id}"


def operator_payable(operator_id: str) -> str:
    return f"liability:operator_payable:{operator_id}"


def city_commission(operator_id: str) -> str:
    return f"revenue:city_commission:{operator_id}"


def refunds(operator_id: str) -> str:
    return f"contra:refunds:{operator_id}"


def merchant_receivable(merchant_id: str) -> str:
    return f"asset:merchant_receivable:{merchant_id}"


def validations_deferred(operator_id: str) -> str:
    return f"liability:validations_deferred:{operator_id}"


def exists(db: Session, kind: str, ref_type: str, ref_id: str) -> bool:
    return (
        db.scalar(
            select(Journal.id).where(
                Journal.kind == kind, Journal.ref_type == ref_type, Journal.ref_id == ref_id
            )
        )
        is not None
    )


def post(
    db: Session,
    *,
    kind: str,
    ref_type: str,
    ref_id: str,
    at: datetime,
    lines: list[tuple[str, int]],
    day: date | None = None,
) -> Journal:
    lines = [(account, amount) for account, amount in lines if amount != 0]
    if sum(amount for _, amount in lines) != 0:
        raise UnbalancedJournal(f"{kind} {ref_id}: lines sum to {sum(a for _, a in lines)}")
    journal = Journal(
        kind=kind, ref_type=ref_type, ref_id=ref_id, business_date=day or business_date(at)
    )
    db.add(journal)
    db.flush()
    for account, amount in lines:
        db.add(LedgerEntry(journal_id=journal.id, account=account, amount_fen=amount))
    db.flush()
    return journal


def capture_lines(
    provider: str, operator_id: str, amount_fen: int, commission_fen: int
) -> list[tuple[str, int]]:
    """The provider holds the money; we owe the operator all of it but the city's commission."""
    return [
        (provider_clearing(provider), amount_fen),
        (operator_payable(operator_id), -(amount_fen - commission_fen)),
        (city_commission(operator_id), -commission_fen),
    ]


def refund_lines(
    provider: str, operator_id: str, amount_fen: int, commission_back_fen: int
) -> list[tuple[str, int]]:
    """The money leaves the provider; the operator bears the refund, the city returns its cut."""
    return [
        (refunds(operator_id), amount_fen),
        (provider_clearing(provider), -amount_fen),
        (city_commission(operator_id), commission_back_fen),
        (operator_payable(operator_id), -commission_back_fen),
    ]


def commission_of(amount_fen: int, bps: int) -> int:
    """Per charge, half up to the fen (shared.money.commission)."""
    return commission(amount_fen, bps)


def commission_back(
    refund_fen: int, bps: int, captured_fen: int, refunded_before_fen: int, taken_back_fen: int
) -> int:
    """The commission returned with a refund: proportional (half up), never more than was
    charged, and exactly the rest once the charge is fully refunded."""
    charged = commission(captured_fen, bps)
    if refunded_before_fen + refund_fen >= captured_fen:
        return charged - taken_back_fen
    return min(commission(refund_fen, bps), charged - taken_back_fen)


@dataclass(frozen=True)
class OperatorDay:
    operator_id: str
    captured_fen: int
    refunded_fen: int
    commission_fen: int

    @property
    def payable_fen(self) -> int:
        return self.captured_fen - self.refunded_fen - self.commission_fen


def operator_days(db: Session, day: date) -> list[OperatorDay]:
    """Each operator's money of one business day, derived from the entries alone."""
    rows = db.execute(
        select(Journal.kind, LedgerEntry.account, func.sum(LedgerEntry.amount_fen))
        .join(Journal, Journal.id == LedgerEntry.journal_id)
        .where(Journal.business_date == day, Journal.kind != JournalKind.settlement)
        .group_by(Journal.kind, LedgerEntry.account)
    ).all()
    acc: dict[str, dict[str, int]] = {}

    def bucket(op: str) -> dict[str, int]:
        return acc.setdefault(op, {"captured": 0, "refunded": 0, "commission": 0})

    for kind, account, total in rows:
        prefix, _, op = account.rpartition(":")
        total = int(total)
        if prefix == "liability:operator_payable" and kind == JournalKind.charge_captured:
            bucket(op)["captured"] -= total
        elif prefix == "revenue:city_commission":
            bucket(op)["commission"] -= total
            if kind == JournalKind.charge_captured:
                bucket(op)["captured"] -= total
        elif prefix == "contra:refunds":
            bucket(op)["refunded"] += total
    return [
        OperatorDay(op, v["captured"], v["refunded"], v["commission"])
        for op, v in sorted(acc.items())
    ]


SETTLED_KINDS = (JournalKind.charge_captured, JournalKind.refund)


@dataclass(frozen=True)
class JournalMoney:
    """What one capture or refund journal means to its operator's settlement."""

    operator_id: str | None
    captured_fen: int
    refunded_fen: int
    commission_fen: int
    clearing_account: str | None


def journal_money(kind: str, lines: Iterable[tuple[str, int]]) -> JournalMoney:
    """The rules of `operator_days`, applied to the lines of a single journal. The operator is
    read from its accounts: a capture always credits its payable or its commission, a refund
    always debits its refunds."""
    operator: str | None = None
    clearing: str | None = None
    captured = refunded = fee = 0
    for account, amount in lines:
        prefix, _, party = account.rpartition(":")
        if prefix == "asset:provider_clearing":
            clearing = account
            continue
        if prefix == "liability:operator_payable" and kind == JournalKind.charge_captured:
            captured -= amount
        elif prefix == "revenue:city_commission":
            fee -= amount
            if kind == JournalKind.charge_captured:
                captured -= amount
        elif prefix == "contra:refunds":
            refunded += amount
        else:
            continue
        operator = party
    return JournalMoney(operator, captured, refunded, fee, clearing)


def check(db: Session) -> tuple[bool, int, int, list[str]]:
    total = db.scalar(select(func.coalesce(func.sum(LedgerEntry.amount_fen), 0))) or 0
    journals = db.scalar(select(func.count()).select_from(Journal)) or 0
    unbalanced = list(
        db.scalars(
            select(LedgerEntry.journal_id)
            .group_by(LedgerEntry.journal_id)
            .having(func.sum(LedgerEntry.amount_fen) != 0)
        )
    )
    return total == 0 and not unbalanced, int(total), int(journals), unbalanced


def balance(db: Session, account: str) -> int:
    return int(
        db.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount_fen), 0)).where(
                LedgerEntry.account == account
            )
        )
        or 0
    )
