"""Our captures and refunds of a day (from the ledger) against the provider's statement.

Keys: a charge by its `out_trade_no` (our charge id), a refund by its `out_refund_no` (our
refund id). Each run is stored; finance resolves a run with differences by a note.
"""

from __future__ import annotations

from datetime import date
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.billing.ledger import service as ledger
from services.billing.ledger.models import Journal, LedgerEntry
from services.billing.provider.port import PaymentProvider, ProviderTimeout, ProviderUnavailable
from services.billing.reconciliation.models import Reconciliation
from services.billing.reconciliation.schemas import Item, Mismatch, ReconciliationOut
from services.billing.refund.models import Refund
from shared.errors import NotFound, UpstreamUnavailable, problem
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)

AlreadyResolved = problem(409, "reconciliation_resolved", "This reconciliation is resolved")
ProviderUnknown = problem(422, "provider_unknown", "Unknown payment provider")
SHANGHAI = ZoneInfo("Asia/Shanghai")
DayOutOfRange = problem(
    422, "reconciliation_day_out_of_range", "There is no statement for this day to reconcile"
)
# Before the first day the city could have taken money, there is nothing to reconcile.
FIRST_DAY = date(2000, 1, 1)

Key = tuple[str, str]  # (kind, ref)


def ours(db: Session, provider: str, day: date) -> dict[Key, tuple[str, int]]:
    """(kind, ref) → (out_trade_no, amount) of what we booked at this provider that day."""
    clearing = ledger.provider_clearing(provider)
    rows = db.execute(
        select(Journal.kind, Journal.ref_id, LedgerEntry.amount_fen)
        .join(LedgerEntry, LedgerEntry.journal_id == Journal.id)
        .where(
            Journal.business_date == day,
            Journal.kind.in_([ledger.JournalKind.charge_captured, ledger.JournalKind.refund]),
            LedgerEntry.account == clearing,
        )
    ).all()
    refund_ids = [ref for kind, ref, _ in rows if kind == ledger.JournalKind.refund]
    charge_of: dict[str, str] = {}
    for refund_id, charge_id in db.execute(
        select(Refund.id, Refund.charge_id).where(Refund.id.in_(refund_ids))
    ):
        charge_of[refund_id] = charge_id
    out: dict[Key, tuple[str, int]] = {}
    for kind, ref, amount in rows:
        if kind == ledger.JournalKind.charge_captured:
            out[("charge", ref)] = (ref, int(amount))
        else:
            out[("refund", ref)] = (charge_of.get(ref, ""), -int(amount))
    return out


def _out(r: Reconciliation) -> ReconciliationOut:
    d: dict[str, Any] = r.differences
    return ReconciliationOut(
        id=r.id,
        date=r.business_date,
        provider=r.provider,
        matched=r.matched,
        missing_ours=d["missing_ours"],
        missing_theirs=d["missing_theirs"],
        amount_mismatch=d["amount_mismatch"],
        status=r.status,
        resolution=r.resolution,
        created_at=r.created_at,
    )


def reconcile(
    db: Session, providers: dict[str, PaymentProvider], provider_name: str, day: date
) -> ReconciliationOut:
    provider = providers.get(provider_name)
    if provider is None:
        raise ProviderUnknown(f"provider must be one of: {', '.join(sorted(providers))}")
    today = utcnow().astimezone(SHANGHAI).date()
    if not FIRST_DAY <= day <= today:
        # A provider's statement covers a business day that has begun; asking a provider for
        # year 1 or next year only makes it fail or wait.
        raise DayOutOfRange(f"date must be between {FIRST_DAY} and {today} (Asia/Shanghai)")
    try:
        statement = provider.statement(day)
    except (ProviderTimeout, ProviderUnavailable) as exc:
        raise UpstreamUnavailable("The provider's statement is not available; retry") from exc
    theirs: dict[Key, tuple[str, int]] = {
        (line.kind, line.out_refund_no or line.out_trade_no): (line.out_trade_no, line.amount_fen)
        for line in statement
    }
    mine = ours(db, provider_name, day)
    matched = 0
    missing_ours: list[Item] = []
    missing_theirs: list[Item] = []
    mismatch: list[Mismatch] = []
    for key, (trade, amount) in sorted(theirs.items()):
        if key not in mine:
            missing_ours.append(
                Item(kind=key[0], ref=key[1], out_trade_no=trade, amount_fen=amount)
            )
        elif mine[key][1] != amount:
            mismatch.append(
                Mismatch(
                    kind=key[0],
                    ref=key[1],
                    out_trade_no=trade,
                    ours_fen=mine[key][1],
                    theirs_fen=amount,
                )
            )
        else:
            matched += 1
    for key, (trade, amount) in sorted(mine.items()):
        if key not in theirs:
            missing_theirs.append(
                Item(kind=key[0], ref=key[1], out_trade_no=trade, amount_fen=amount)
            )
    clean = not (missing_ours or missing_theirs or mismatch)
    record = Reconciliation(
        business_date=day,
        provider=provider_name,
        matched=matched,
        differences={
            "missing_ours": [i.model_dump() for i in missing_ours],
            "missing_theirs": [i.model_dump() for i in missing_theirs],
            "amount_mismatch": [m.model_dump() for m in mismatch],
        },
        status="clean" if clean else "open",
    )
    db.add(record)
    db.flush()
    log.info(
        "reconciliation.run",
        date=day.isoformat(),
        matched=matched,
        missing_ours=len(missing_ours),
        missing_theirs=len(missing_theirs),
        amount_mismatch=len(mismatch),
    )
    return _out(record)


def listing(db: Session, day: date | None, limit: int = 50) -> list[ReconciliationOut]:
    query = select(Reconciliation).order_by(Reconciliation.created_at.desc()).limit(limit)
    if day is not None:
        query = query.where(Reconciliation.business_date == day)
    return [_out(r) for r in db.scalars(query)]


def resolve(db: Session, reconciliation_id: str, admin_id: str, note: str) -> ReconciliationOut:
    record = db.get(Reconciliation, reconciliation_id)
    if record is None:
        raise NotFound("No such reconciliation")
    if record.status == "resolved":
        raise AlreadyResolved()
    record.status, record.resolution = "resolved", note
    record.resolved_by, record.resolved_at = admin_id, utcnow()
    db.flush()
    return _out(record)
