"""Disputes and refunds. A refund is a small state machine of its own, like a charge:

    pending ──send──▶ succeeded | failed
       │  └─timeout─▶ unknown ──query──▶ succeeded | (never seen) pending
       └─transient error─▶ pending again, later (backoff)

Its id is the provider's `out_refund_no`, so a resend can never refund twice. Success books a
reversing journal on the day the provider refunded (ledger.refund_lines).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from services.billing.charge.models import Charge, ChargeStatus
from services.billing.charge.service import DUE as charges_due
from services.billing.ledger import service as ledger
from services.billing.notification import hooks as refund_hooks
from services.billing.provider.port import (
    PaymentProvider,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RefundResult,
)
from services.billing.refund.models import Dispute, DisputeStatus, Refund, RefundStatus
from shared import wakeups, workqueue
from shared.errors import NotFound, problem
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)
MAX_BACKOFF = timedelta(minutes=10)
LEASE = timedelta(seconds=30)  # a worker's hold on a refund it is asking about

ChargeNotDisputable = problem(
    409, "charge_not_disputable", "Only a captured charge can be disputed"
)
DisputeAlreadyOpen = problem(409, "dispute_already_open", "This charge already has an open dispute")
DisputeDecided = problem(409, "dispute_already_decided", "This dispute was already decided")
RefundExceedsCaptured = problem(
    422, "refund_exceeds_captured", "The refund would exceed what was captured"
)


def open_dispute(db: Session, driver_id: str, charge_id: str, reason: str) -> Dispute:
    charge = db.get(Charge, charge_id)
    if charge is None or charge.driver_id != driver_id:
        raise NotFound("No such charge")
    if charge.status != ChargeStatus.captured:
        raise ChargeNotDisputable(f"The charge is {charge.status}")
    if db.scalar(
        select(Dispute.id).where(
            Dispute.charge_id == charge_id,
            Dispute.status.in_([DisputeStatus.open, DisputeStatus.refund_pending]),
        )
    ):
        raise DisputeAlreadyOpen()
    dispute = Dispute(charge_id=charge_id, driver_id=driver_id, reason=reason)
    db.add(dispute)
    db.flush()
    log.info("dispute.opened", dispute_id=dispute.id, charge_id=charge_id)
    return dispute


def disputes_of_charge(db: Session, charge_id: str) -> list[Dispute]:
    return list(
        db.scalars(
            select(Dispute).where(Dispute.charge_id == charge_id).order_by(Dispute.created_at)
        )
    )


def refundable_fen(db: Session, charge: Charge) -> int:
    """Captured minus every refund that has not failed (pending ones are money promised)."""
    promised = db.scalar(
        select(func.coalesce(func.sum(Refund.amount_fen), 0)).where(
            Refund.charge_id == charge.id, Refund.status != RefundStatus.failed
        )
    )
    return charge.amount_fen - int(promised or 0)


def decide(
    db: Session, dispute_id: str, admin_id: str, outcome: str, amount_fen: int | None
) -> Dispute:
    query = select(Dispute).where(Dispute.id == dispute_id)
    if db.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()  # two finance clicks must not both refund
    dispute = db.scalar(query)
    if dispute is None:
        raise NotFound("No such dispute")
    if dispute.status != DisputeStatus.open:
        raise DisputeDecided(f"The dispute is {dispute.status}")
    dispute.outcome, dispute.decided_by, dispute.decided_at = outcome, admin_id, utcnow()
    if outcome == "reject":
        dispute.status = DisputeStatus.rejected
        db.flush()
        return dispute
    charge_query = select(Charge).where(Charge.id == dispute.charge_id)
    if db.get_bind().dialect.name == "postgresql":
        charge_query = charge_query.with_for_update()
    charge = db.scalar(charge_query)
    assert charge is not None  # a dispute always has its charge
    room = refundable_fen(db, charge)
    amount = room if amount_fen is None else amount_fen
    if amount <= 0 or amount > room:
        raise RefundExceedsCaptured(
            f"captured {charge.amount_fen}, refundable {room}, asked {amount}",
            refundable_fen=room,
        )
    refund = Refund(charge_id=charge.id, dispute_id=dispute.id, amount_fen=amount)
    db.add(refund)
    wakeups.after_commit(db, charges_due)  # the money worker sends refunds after charges
    db.flush()
    dispute.status, dispute.amount_fen, dispute.refund_id = (
        DisputeStatus.refund_pending,
        amount,
        refund.id,
    )
    db.flush()
    log.info("dispute.refund_approved", dispute_id=dispute.id, amount_fen=amount)
    return dispute


def _succeed(db: Session, refund: Refund, result: RefundResult) -> None:
    charge_query = select(Charge).where(Charge.id == refund.charge_id)
    if db.get_bind().dialect.name == "postgresql":
        charge_query = charge_query.with_for_update()  # refunds of a charge book one at a time
    charge = db.scalar(charge_query)
    assert charge is not None
    taken_back = db.scalar(
        select(func.coalesce(func.sum(Refund.commission_fen), 0)).where(
            Refund.charge_id == charge.id, Refund.status == RefundStatus.succeeded
        )
    )
    refund.commission_fen = ledger.commission_back(
        refund.amount_fen,
        charge.commission_bps,
        charge.amount_fen,
        charge.refunded_fen,
        int(taken_back or 0),
    )
    refund.status = RefundStatus.succeeded
    refund.refunded_at = result.refunded_at
    refund.failure_code = None
    charge.refunded_fen += refund.amount_fen
    ledger.post(
        db,
        kind=ledger.JournalKind.refund,
        ref_type="refund",
        ref_id=refund.id,
        at=result.refunded_at,
        lines=ledger.refund_lines(
            charge.provider or "sandbox",
            charge.operator_id,
            refund.amount_fen,
            refund.commission_fen,
        ),
    )
    _settle_dispute(db, refund, DisputeStatus.refunded)
    refund_hooks.refund_succeeded(db, charge, refund)  # red-letter invoice, notification
    log.info("refund.succeeded", refund_id=refund.id, amount_fen=refund.amount_fen)


def _settle_dispute(db: Session, refund: Refund, status: DisputeStatus) -> None:
    if refund.dispute_id:
        dispute = db.get(Dispute, refund.dispute_id)
        if dispute is not None:
            dispute.status = status


def apply_notice(db: Session, refund: Refund, result: RefundResult) -> bool:
    """The provider's signed refund notice, in any order relative to its synchronous answer."""
    if refund.status == RefundStatus.succeeded or result.amount_fen != refund.amount_fen:
        return False
    _succeed(db, refund, result)
    return True


def _backoff(refund: Refund) -> None:
    refund.attempts += 1
    refund.next_attempt_at = utcnow() + min(
        timedelta(seconds=2 ** min(refund.attempts, 10)), MAX_BACKOFF
    )


@dataclass(frozen=True)
class _Ask:
    refund_id: str
    charge_id: str
    provider: str
    amount_fen: int
    query: bool  # the last send went unanswered: ask before sending again


def _prepare(db: Session, refund: Refund) -> _Ask | None:
    if refund.status not in (RefundStatus.pending, RefundStatus.unknown):
        return None
    charge = db.get(Charge, refund.charge_id)
    if charge is None:  # a refund always belongs to a charge; this is a bug, not an outage
        raise LookupError(f"refund {refund.id} has no charge {refund.charge_id}")
    return _Ask(
        refund.id,
        charge.id,
        charge.provider or "sandbox",
        refund.amount_fen,
        refund.status == RefundStatus.unknown,
    )


def _ask(providers: dict[str, PaymentProvider], ask: _Ask) -> tuple[str, object]:
    """One question to the provider with no transaction open: (`result`, RefundResult),
    (`never_seen`, None), (`timeout`, None), (`unavailable`, None) or (`rejected`, code)."""
    provider = providers[ask.provider]
    try:
        if ask.query:
            found = provider.query_refund(ask.refund_id)
            return ("never_seen", None) if found is None else ("result", found)
        return "result", provider.refund(
            out_trade_no=ask.charge_id, out_refund_no=ask.refund_id, amount_fen=ask.amount_fen
        )
    except ProviderTimeout:
        return "timeout", None
    except ProviderUnavailable:
        return "unavailable", None
    except ProviderRejected as exc:
        return "rejected", exc.code


def record(db: Session, refund: Refund, answer: str, value: object = None) -> None:
    """Book the answer against the refund as it is now (read afresh under its row lock): a
    signed notice may have settled it while the provider was being asked."""
    if answer == "result" and isinstance(value, RefundResult):
        if refund.status != RefundStatus.succeeded:
            _succeed(db, refund, value)
        return
    if refund.status not in (RefundStatus.pending, RefundStatus.unknown):
        return
    if answer == "never_seen":
        refund.status = RefundStatus.pending
        refund.next_attempt_at = utcnow()
    elif answer == "timeout":
        refund.status = RefundStatus.unknown
        _backoff(refund)
    elif answer == "rejected":
        refund.status, refund.failure_code = RefundStatus.failed, str(value)
        _settle_dispute(db, refund, DisputeStatus.refund_failed)
        log.warning("refund.failed", refund_id=refund.id, code=value)
    else:
        _backoff(refund)


def advance(db: Session, providers: dict[str, PaymentProvider], refund: Refund) -> None:
    """Move one refund one step inside one transaction (tests and tools; the worker uses
    `process_due`, which keeps no transaction open while it asks)."""
    ask = _prepare(db, refund)
    if ask is not None:
        answer, value = _ask(providers, ask)
        record(db, refund, answer, value)


_strikes = workqueue.Strikes()


def _step(factory: sessionmaker[Session], providers: dict[str, PaymentProvider], rid: str) -> None:
    with factory() as db, db.begin():
        refund = workqueue.locked(db, Refund, rid)
        ask = None if refund is None else _prepare(db, refund)
    if ask is None:
        return
    answer, value = _ask(providers, ask)
    with factory() as db, db.begin():
        refund = workqueue.locked(db, Refund, rid)
        if refund is not None:
            record(db, refund, answer, value)


def _park(refund: Refund, exc: Exception) -> None:
    refund.status = RefundStatus.parked
    refund.failure_code = f"parked:{type(exc).__name__}"[:60]


def process_due(
    factory: sessionmaker[Session], providers: dict[str, PaymentProvider], limit: int = 20
) -> int:
    """Claim due refunds (a lease), ask the provider with no transaction open, record each
    answer in its own transaction; returns how many were taken."""
    return workqueue.run_due(
        factory,
        Refund,
        Refund.status.in_([RefundStatus.pending, RefundStatus.unknown]),
        lambda rid: _step(factory, providers, rid),
        queue="refunds",
        strikes=_strikes,
        is_open=lambda r: r.status in (RefundStatus.pending, RefundStatus.unknown),
        park=_park,
        lease=LEASE,
        limit=limit,
    )


def replay_parked(db: Session, refund_id: str) -> Refund:
    """Put a parked refund back in the queue, asked about first (`unknown`)."""
    refund = workqueue.locked(db, Refund, refund_id)
    if refund is None or refund.status != RefundStatus.parked:
        raise NotFound("No parked refund with this id")
    refund.status = RefundStatus.unknown
    refund.failure_code = None
    refund.next_attempt_at = utcnow()
    _strikes.clear(refund.id)
    log.info("refund.replayed", refund_id=refund.id)
    return refund
