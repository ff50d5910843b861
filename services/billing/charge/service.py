"""The charge lifecycle, an explicit state machine (docs/billing.md has the full diagram):

    pending ──send──▶ captured | declined
       │  └─timeout─▶ unknown ──query──▶ captured | declined | (never seen) pending
       └─transient error─▶ pending again, later (backoff)
    declined ──pay arrears──▶ pending          any state ──signed "captured" notice──▶ captured

A charge is created in the same transaction that consumes its session's closing event and is
sent to the provider afterwards by the charge worker, so a crash between the two loses nothing:
the worker finds the charge still pending (or unknown) and carries on. The provider request
always carries the charge id as `out_trade_no`, so a resend can never take money twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import structlog
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from services.billing.charge.models import Charge, ChargeStatus
from services.billing.driver import service as drivers
from services.billing.driver.models import Driver, PaymentAccount
from services.billing.ledger import service as ledger
from services.billing.merchant import service as merchants
from services.billing.notification import hooks
from services.billing.provider.port import (
    ChargeResult,
    Outcome,
    PaymentProvider,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from shared import wakeups, workqueue
from shared.bus.outbox import enqueue
from shared.errors import NotFound
from shared.events import ChargeEvent, Decision, EventType, SessionClosed, new_event
from shared.internal import InternalClient
from shared.pii_columns import index_in
from shared.settings import Settings
from shared.timeutil import utcnow
from shared.topics import BILLING_EVENTS

log = structlog.get_logger(__name__)
SOURCE = "billing"
DUE = "billing:charges"  # wakes the charge workers when a charge becomes due
MAX_BACKOFF = timedelta(minutes=10)
# A charge taken by a worker is its own for this long; a worker that dies hands it back then.
# Longer than any provider answer (3 s timeout) plus the bookkeeping around it.
LEASE = timedelta(seconds=30)


def billable(closed: SessionClosed) -> bool:
    return closed.decision == Decision.postpay and bool(closed.driver_id)


def _price_request(closed: SessionClosed) -> dict[str, Any]:
    return {
        "lot_id": closed.lot_id,
        "entered_at": closed.entered_at.isoformat(),
        "exited_at": closed.exited_at.isoformat(),
        "vehicle_type": closed.vehicle_type,
        "plate_color": closed.plate_color,
        "plate": closed.plate,
    }


def prices_for(lots: InternalClient, closed: list[SessionClosed]) -> dict[str, dict[str, Any]]:
    """Price many closed sessions in one call to lots, by session id. A stay lots could not
    price is left out: `open_charge` then asks for it alone and meets the problem itself."""
    wanted = [c for c in closed if billable(c)]
    if not wanted:
        return {}
    answer: dict[str, Any] = lots.call(
        "POST", "/internal/lots/prices", json={"items": [_price_request(c) for c in wanted]}
    )
    return {
        c.session_id: item["price"]
        for c, item in zip(wanted, answer["items"], strict=True)
        if item.get("price") is not None
    }


def open_charge(
    db: Session,
    lots: InternalClient,
    closed: SessionClosed,
    price: dict[str, Any] | None = None,
) -> Charge | None:
    """Create the one charge of a closed post-pay session (idempotent on the session id).
    `price` is lots' answer for the stay when it was asked already (a batch)."""
    if not billable(closed):
        merchants.lapse(db, closed.session_id)
        return None
    existing = db.scalar(select(Charge).where(Charge.session_id == closed.session_id))
    if existing is not None:
        return existing
    price_request = _price_request(closed)
    if price is None:
        price = lots.call("POST", f"/internal/lots/{closed.lot_id}/price", json=price_request)
        assert price is not None
    amount = int(price["fee_fen"])
    charge = Charge(
        session_id=closed.session_id,
        driver_id=closed.driver_id,
        lot_id=closed.lot_id,
        lot_code=closed.lot_code,
        operator_id=closed.operator_id,
        district=closed.district,
        plate=closed.plate,
        plate_color=closed.plate_color,
        entered_at=closed.entered_at,
        exited_at=closed.exited_at,
        amount_fen=amount,
        # Until lots answers it with the price, the commission is 0 bps (docs/billing.md).
        commission_bps=int(price.get("commission_bps") or 0),
        breakdown={"lines": price["breakdown"]},
        status=ChargeStatus.free if amount == 0 else ChargeStatus.pending,
    )
    db.add(charge)
    db.flush()
    wakeups.after_commit(db, DUE)
    # Merchants' validations of the stay lower the fee (minutes first, then amounts).
    merchants.apply_validations(db, lots, charge, price_request)
    hooks.session_charged(db, closed, charge)  # the exit notification, with the fee
    log.info(
        "charge.opened",
        charge_id=charge.id,
        session_id=closed.session_id,
        amount_fen=charge.amount_fen,
    )
    return charge


def _publish(db: Session, charge: Charge, type_: EventType) -> None:
    data = ChargeEvent(
        charge_id=charge.id,
        session_id=charge.session_id,
        driver_id=charge.driver_id,
        operator_id=charge.operator_id,
        amount_fen=charge.amount_fen,
        status=charge.status,
        failure_code=charge.failure_code,
    )
    enqueue(
        db,
        source=SOURCE,
        topic=BILLING_EVENTS,
        key=charge.driver_id,
        event=new_event(
            type_,
            source=SOURCE,
            data=data,
            subject=charge.id,
            id_=f"{type_}-{charge.id}-{charge.attempts}",
        ),
    )


def _apply(db: Session, settings: Settings, charge: Charge, result: ChargeResult) -> None:
    """Book the provider's final answer. Callers hold the charge's row lock and have checked
    that it is not captured yet, so a capture is booked once whichever answer comes first."""
    if result.outcome is Outcome.captured:
        charge.status = ChargeStatus.captured
        charge.provider = charge.provider or "sandbox"
        charge.provider_trade_no = result.trade_no
        charge.captured_at = result.captured_at or utcnow()
        charge.failure_code = None
        fee = ledger.commission_of(charge.amount_fen, charge.commission_bps)
        # Booked once per charge; a capture journal already there (a database from before
        # captures were serialised) is kept, never doubled.
        if not ledger.exists(db, ledger.JournalKind.charge_captured, "charge", charge.id):
            ledger.post(
                db,
                kind=ledger.JournalKind.charge_captured,
                ref_type="charge",
                ref_id=charge.id,
                at=charge.captured_at,
                lines=ledger.capture_lines(
                    charge.provider, charge.operator_id, charge.amount_fen, fee
                ),
            )
        if ledger.exists(db, ledger.JournalKind.arrears_opened, "charge", charge.id):
            ledger.post(
                db,
                kind=ledger.JournalKind.arrears_cleared,
                ref_type="charge",
                ref_id=charge.id,
                at=charge.captured_at,
                lines=[
                    (ledger.arrears_deferred(charge.operator_id), charge.amount_fen),
                    (ledger.driver_receivable(charge.driver_id), -charge.amount_fen),
                ],
            )
        _publish(db, charge, EventType.charge_captured)
        log.info("charge.captured", charge_id=charge.id, amount_fen=charge.amount_fen)
    else:
        charge.status = ChargeStatus.declined
        charge.failure_code = result.failure_code or "declined"
        if not ledger.exists(db, ledger.JournalKind.arrears_opened, "charge", charge.id):
            ledger.post(
                db,
                kind=ledger.JournalKind.arrears_opened,
                ref_type="charge",
                ref_id=charge.id,
                at=utcnow(),
                lines=[
                    (ledger.driver_receivable(charge.driver_id), charge.amount_fen),
                    (ledger.arrears_deferred(charge.operator_id), -charge.amount_fen),
                ],
            )
        _publish(db, charge, EventType.charge_declined)
        log.info("charge.declined", charge_id=charge.id, reason=charge.failure_code)
    # Arrears (and so post-pay) may have changed: if so, the gate must learn it.
    drivers.refresh_account_state(db, settings, drivers.get_driver(db, charge.driver_id))


def apply_notice(db: Session, settings: Settings, charge: Charge, result: ChargeResult) -> bool:
    """A signed capture notice from the provider, in whatever order it arrives relative to the
    synchronous answer; True when it changed something."""
    if charge.status == ChargeStatus.captured or result.outcome is not Outcome.captured:
        # Only captures are notified; a capture already booked is the duplicate case.
        return False
    _apply(db, settings, charge, result)
    return True


def _backoff(charge: Charge) -> None:
    charge.attempts += 1
    delay = min(timedelta(seconds=2 ** min(charge.attempts, 10)), MAX_BACKOFF)
    charge.next_attempt_at = utcnow() + delay


@dataclass(frozen=True)
class _Ask:
    """What the worker asks the provider about one charge, taken from the row in a short
    transaction so that no transaction stays open while the provider thinks."""

    charge_id: str
    query: bool  # the last send went unanswered: ask what happened before sending again
    provider: str
    agreement_no: str
    amount_fen: int
    lot_code: str


class _Answer(StrEnum):
    result = "result"  # a final answer: captured or declined
    never_seen = "never_seen"  # the provider has no such trade: sending again is safe
    timeout = "timeout"  # no answer: the charge may or may not have been taken
    unavailable = "unavailable"  # the provider could not be reached: nothing happened


def _prepare(db: Session, settings: Settings, charge: Charge) -> _Ask | None:
    """The charge's next question to the provider, or None when there is none to ask."""
    if charge.status not in (ChargeStatus.pending, ChargeStatus.unknown):
        return None
    account = db.get(PaymentAccount, charge.driver_id)
    if charge.status == ChargeStatus.pending:
        if account is None:
            charge.status = ChargeStatus.declined
            charge.failure_code = "no_account"
            _publish(db, charge, EventType.charge_declined)
            drivers.refresh_account_state(db, settings, drivers.get_driver(db, charge.driver_id))
            return None
        charge.provider = account.provider
        charge.agreement_no = account.agreement_no
    return _Ask(
        charge_id=charge.id,
        query=charge.status == ChargeStatus.unknown,
        provider=charge.provider or "sandbox",
        agreement_no=charge.agreement_no or "",
        amount_fen=charge.amount_fen,
        lot_code=charge.lot_code,
    )


def _ask(providers: dict[str, PaymentProvider], ask: _Ask) -> tuple[_Answer, ChargeResult | None]:
    """One question to the provider, with no transaction open. The request always carries the
    charge id as `out_trade_no`, so asking twice can never take the money twice."""
    provider = providers[ask.provider]
    try:
        if ask.query:
            found = provider.query(ask.charge_id)
            return (_Answer.never_seen, None) if found is None else (_Answer.result, found)
        return _Answer.result, provider.charge(
            agreement_no=ask.agreement_no,
            out_trade_no=ask.charge_id,
            amount_fen=ask.amount_fen,
            description=f"Parking at {ask.lot_code}",
        )
    except ProviderTimeout:
        return _Answer.timeout, None
    except ProviderUnavailable:
        return _Answer.unavailable, None
    except ProviderRejected as exc:
        # The provider refuses the request itself: never retried blindly, it is arrears.
        return _Answer.result, ChargeResult(Outcome.declined, None, exc.code, None)


def record(
    db: Session,
    settings: Settings,
    charge: Charge,
    answer: _Answer,
    result: ChargeResult | None = None,
) -> None:
    """Book the provider's answer against the charge *as it is now* (the caller read it afresh
    under its row lock): a signed notice may have captured it while the provider was being
    asked, and a stale answer must never overwrite that."""
    open_ = charge.status in (ChargeStatus.pending, ChargeStatus.unknown)
    if answer is _Answer.result and result is not None:
        if result.outcome is Outcome.captured and charge.status != ChargeStatus.captured:
            _apply(db, settings, charge, result)  # money taken is booked, whatever came first
        elif result.outcome is Outcome.declined and open_:
            _apply(db, settings, charge, result)
    elif not open_:
        return
    elif answer is _Answer.never_seen:
        charge.status = ChargeStatus.pending
        charge.next_attempt_at = utcnow()
    elif answer is _Answer.timeout:
        charge.status = ChargeStatus.unknown
        _backoff(charge)
        log.warning("charge.unknown", charge_id=charge.id, attempts=charge.attempts)
    else:
        _backoff(charge)
        log.warning("charge.retry", charge_id=charge.id, attempts=charge.attempts)


def advance(
    db: Session, settings: Settings, providers: dict[str, PaymentProvider], charge: Charge
) -> None:
    """Move one charge one step along its state machine inside one transaction (tests and
    tools; the worker uses `process_due`, which keeps no transaction open while it asks)."""
    ask = _prepare(db, settings, charge)
    if ask is not None:
        answer, result = _ask(providers, ask)
        record(db, settings, charge, answer, result)


_strikes = workqueue.Strikes()


def _step(
    factory: sessionmaker[Session],
    settings: Settings,
    providers: dict[str, PaymentProvider],
    charge_id: str,
) -> None:
    with factory() as db, db.begin():
        charge = workqueue.locked(db, Charge, charge_id)
        ask = None if charge is None else _prepare(db, settings, charge)
    if ask is None:
        return
    answer, result = _ask(providers, ask)
    with factory() as db, db.begin():
        charge = workqueue.locked(db, Charge, charge_id)
        if charge is not None:
            record(db, settings, charge, answer, result)


def _park(charge: Charge, exc: Exception) -> None:
    charge.status = ChargeStatus.parked
    charge.failure_code = f"parked:{type(exc).__name__}"[:60]


def _open(charge: Charge) -> bool:
    return charge.status in (ChargeStatus.pending, ChargeStatus.unknown)


def process_due(
    factory: sessionmaker[Session],
    settings: Settings,
    providers: dict[str, PaymentProvider],
    limit: int = 20,
) -> int:
    """Advance up to `limit` due charges; returns how many were taken.

    The batch is claimed in one short transaction (a lease, shared/workqueue.py), so any
    number of workers (threads or billing replicas) share the queue without taking one charge
    twice, on PostgreSQL and on SQLite. Each charge is then asked about with no transaction
    open and its answer recorded in its own; one that fails goes back with backoff or, after
    repeated unexpected errors, is parked, and never holds up the charges behind it."""
    return workqueue.run_due(
        factory,
        Charge,
        Charge.status.in_([ChargeStatus.pending, ChargeStatus.unknown]),
        lambda charge_id: _step(factory, settings, providers, charge_id),
        queue="charges",
        strikes=_strikes,
        is_open=_open,
        park=_park,
        lease=LEASE,
        limit=limit,
    )


def parked(db: Session, limit: int = 100) -> list[Charge]:
    return list(
        db.scalars(
            select(Charge)
            .where(Charge.status == ChargeStatus.parked)
            .order_by(Charge.updated_at)
            .limit(limit)
        )
    )


def replay_parked(db: Session, charge_id: str) -> Charge:
    """Put a parked charge back in the queue. It is asked about first (`unknown`): the provider
    may have taken the money before the error, and a query never takes it twice."""
    charge = workqueue.locked(db, Charge, charge_id)
    if charge is None or charge.status != ChargeStatus.parked:
        raise NotFound("No parked charge with this id")
    charge.status = ChargeStatus.unknown
    charge.failure_code = None
    charge.next_attempt_at = utcnow()
    _strikes.clear(charge.id)
    wakeups.after_commit(db, DUE)
    log.info("charge.replayed", charge_id=charge.id)
    return charge


def charges_of(db: Session, driver_id: str, limit: int = 100) -> list[Charge]:
    return list(
        db.scalars(
            select(Charge)
            .where(Charge.driver_id == driver_id)
            .order_by(Charge.created_at.desc())
            .limit(limit)
        )
    )


def arrears_of(db: Session, driver_id: str) -> list[Charge]:
    return list(
        db.scalars(
            select(Charge)
            .where(Charge.driver_id == driver_id, Charge.status == ChargeStatus.declined)
            .order_by(Charge.exited_at)
        )
    )


def pay_arrears(db: Session, driver_id: str) -> list[Charge]:
    """Send every declined charge again now (e.g. after topping up or binding a new account)."""
    if db.get(PaymentAccount, driver_id) is None:
        raise drivers.NoAccount("Bind a payment account first")
    owed = arrears_of(db, driver_id)
    for charge in owed:
        charge.status = ChargeStatus.pending
        charge.next_attempt_at = utcnow()
        charge.attempts += 1  # a new attempt: its events get new ids
    db.flush()
    wakeups.after_commit(db, DUE)
    return owed


def get_charge_for(db: Session, driver_id: str, charge_id: str) -> Charge:
    charge = db.get(Charge, charge_id)
    if charge is None or charge.driver_id != driver_id:
        raise NotFound("No such charge")
    return charge


def stats(db: Session, since: datetime) -> dict[str, Any]:
    """Billing's share of the city's figures: drivers, money settled and arrears, and the money
    figures again per district."""

    def scalar(q: Any) -> int:
        return int(db.scalar(q) or 0)

    captured = Charge.status == ChargeStatus.captured
    declined = Charge.status == ChargeStatus.declined
    amount = select(func.coalesce(func.sum(Charge.amount_fen), 0))
    per_district = db.execute(
        select(
            Charge.district,
            func.count(Charge.driver_id.distinct()).label("postpay_drivers"),
            func.count().filter(captured).label("charges_captured"),
            func.coalesce(func.sum(Charge.amount_fen).filter(captured), 0).label("captured_fen"),
            func.count().filter(declined).label("charges_in_arrears"),
            func.coalesce(func.sum(Charge.amount_fen).filter(declined), 0).label("arrears_fen"),
        )
        .where(Charge.district.is_not(None))
        .group_by(Charge.district)
    )
    return {
        "registered_drivers": scalar(select(func.count()).select_from(Driver)),
        "new_drivers_since": scalar(
            select(func.count()).select_from(Driver).where(Driver.created_at >= since)
        ),
        "enrolled_drivers": scalar(select(func.count()).select_from(PaymentAccount)),
        "charges_captured": scalar(select(func.count()).select_from(Charge).where(captured)),
        "captured_fen": scalar(amount.where(captured)),
        "captured_fen_since": scalar(amount.where(captured, Charge.captured_at >= since)),
        "charges_in_arrears": scalar(select(func.count()).select_from(Charge).where(declined)),
        "arrears_fen": scalar(amount.where(declined)),
        "by_district": {
            row.district: {
                "postpay_drivers": int(row.postpay_drivers),
                "charges_captured": int(row.charges_captured),
                "captured_fen": int(row.captured_fen),
                "charges_in_arrears": int(row.charges_in_arrears),
                "arrears_fen": int(row.arrears_fen),
            }
            for row in per_district
        },
    }


def sweep_arrears(db: Session, settings: Settings, limit: int = 500) -> int:
    """Suspend drivers whose oldest arrears just passed the grace period.

    Declines and captures publish the new state themselves; only the passing of time needs a
    periodic look. Returns how many drivers' state was published."""
    cutoff = utcnow() - timedelta(days=settings.arrears_grace_days)
    overdue = (
        select(Charge.driver_id)
        .where(Charge.status == ChargeStatus.declined, Charge.exited_at < cutoff)
        .distinct()
    )
    stale = list(
        db.scalars(
            select(Driver)
            .where(
                Driver.id.in_(overdue),
                or_(Driver.postpay_published.is_(None), Driver.postpay_published != "suspended"),
            )
            .limit(limit)
        )
    )
    for driver in stale:
        drivers.publish_account_state(db, settings, driver)
        log.info("arrears.suspended", driver_id=driver.id)
    return len(stale)


def search_arrears(
    db: Session,
    *,
    phone: str | None = None,
    driver_id: str | None = None,
    min_fen: int = 0,
    older_than_days: int | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Drivers with arrears, biggest first: for ops to see, chase and search. Phones are in
    full: the endpoint masks them for whoever reads."""
    owed = func.sum(Charge.amount_fen)
    query = (
        select(
            Driver.id,
            Driver.phone,
            Driver.postpay_published,
            owed.label("arrears_fen"),
            func.count(Charge.id).label("charges"),
            func.min(Charge.exited_at).label("oldest"),
        )
        .join(Driver, Driver.id == Charge.driver_id)
        .where(Charge.status == ChargeStatus.declined)
        .group_by(Driver.id, Driver.phone, Driver.postpay_published)
        .having(owed >= min_fen)
        .order_by(owed.desc(), Driver.id)
        .limit(limit)
    )
    if phone:
        query = query.where(
            Driver.phone_bidx == index_in(db, "phone", drivers.normalize_phone(phone))
        )
    if driver_id:
        query = query.where(Driver.id == driver_id)
    if older_than_days is not None:
        query = query.having(
            func.min(Charge.exited_at) < utcnow() - timedelta(days=older_than_days)
        )
    return [
        {
            "driver_id": row.id,
            "phone": row.phone,  # masked (or not) by the caller's view
            "postpay": row.postpay_published,
            "arrears_fen": int(row.arrears_fen),
            "charges": int(row.charges),
            "oldest_exited_at": row.oldest,
        }
        for row in db.execute(query)
    ]
