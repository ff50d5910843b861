"""Journals and the ledger check. Every movement of money is one balanced journal."""

from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.billing.ledger.models import Journal, LedgerEntry

SHANGHAI = ZoneInfo("Asia/Shanghai")


class UnbalancedJournal(ValueError):
    pass


def business_date(at: datetime) -> date:
    """Money belongs to the Asia/Shanghai day on which the provider moved it."""
    return at.astimezone(SHANGHAI).date()


def provider_account(provider: str) -> str:
    return f"asset:provider:{provider}"


def operator_payable(operator_id: str) -> str:
    return f"liability:operator:{operator_id}"


def post(
    db: Session,
    *,
    kind: str,
    ref_type: str,
    ref_id: str,
    at: datetime,
    lines: list[tuple[str, int]],
) -> Journal:
    if sum(amount for _, amount in lines) != 0:
        raise UnbalancedJournal(f"{kind} {ref_id}: lines sum to {sum(a for _, a in lines)}")
    journal = Journal(kind=kind, ref_type=ref_type, ref_id=ref_id, business_date=business_date(at))
    db.add(journal)
    db.flush()
    for account, amount in lines:
        db.add(LedgerEntry(journal_id=journal.id, account=account, amount_fen=amount))
    db.flush()
    return journal


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
