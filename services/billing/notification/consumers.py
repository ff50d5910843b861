"""The notification consumer: turns what happens to a driver (entries, exits, charges, post-pay
state, refunds) into notifications, in its own consumer group; and the delivery worker."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.billing.charge.models import Charge
from services.billing.driver import service as drivers
from services.billing.notification import hooks, texts
from services.billing.notification import service as notifications
from services.billing.notification.models import Channel, NotificationKind, PostpayWatch
from services.billing.notification.port import NotificationChannel, SmsSandbox, WebhookChannel
from services.billing.notification.urlguard import UrlGuard
from services.billing.vehicle import service as vehicles
from shared.bus.consumer import BatchHandler, ConsumerLoop, dead_letter_to_db, idempotent
from shared.bus.factory import make_subscription
from shared.bus.port import Message
from shared.events import (
    AccountUpdated,
    ChargeEvent,
    Decision,
    EventType,
    ParkingEvent,
    PostpayStatus,
    RefundEvent,
    SessionClosed,
)
from shared.plates import mask_plate_for_message
from shared.runtime import Runtime, Worker
from shared.settings import Settings
from shared.timeutil import utcnow
from shared.topics import ACCOUNT_EVENTS, BILLING_EVENTS, PARKING_EVENTS, SESSIONS_CLOSED

log = structlog.get_logger(__name__)
GROUP = "citypark-billing-notifications"
TOPICS = (PARKING_EVENTS, SESSIONS_CLOSED, BILLING_EVENTS, ACCOUNT_EVENTS)
RELEVANT = {
    EventType.parking_entry,
    EventType.session_closed,
    EventType.charge_captured,
    EventType.charge_declined,
    EventType.account_updated,
    EventType.refund_succeeded,
}
# An exit read this long after it was published without a charge is told without the fee.
EXIT_WAIT = timedelta(seconds=60)


def _entry(db: Session, settings: Settings, e: ParkingEvent) -> None:
    # Only the driver who held the plate verified when the car entered is told where it is.
    vehicle = vehicles.verified_holder(db, e.plate, e.plate_color, e.occurred_at)
    if vehicle is None:
        return
    # Only a post-pay stay is news to the driver: the car will leave without paying at the gate.
    if drivers.postpay_status(db, settings, vehicle.driver_id) != PostpayStatus.active:
        return
    plate = mask_plate_for_message(e.plate)
    title, body = texts.entry(plate, e.lot_code, e.occurred_at)
    notifications.notify(
        db,
        driver_id=vehicle.driver_id,
        kind=NotificationKind.entry,
        key=f"entry:{e.lot_id}:{e.event_id}",
        title=title,
        body=body,
        plate=plate,
        ref_id=e.event_id,
    )


def _exit(db: Session, closed: SessionClosed, published_at: datetime) -> None:
    """Normally billing tells the exit when it opens the charge (`hooks.session_charged`); here
    only an exit whose charge never came (its pricing failed) is told, late and without the fee.
    Nothing waits: a consumer holding a message for a charge would hold every driver's news."""
    if closed.decision != Decision.postpay or not closed.driver_id:
        return
    if utcnow() - published_at < EXIT_WAIT:
        return
    if db.scalar(select(Charge.id).where(Charge.session_id == closed.session_id)) is not None:
        return  # told with the fee when the charge opened
    hooks.tell_exit(db, closed, None)


def _charge(db: Session, event_id: str, type_: str, data: ChargeEvent) -> None:
    charge = db.get(Charge, data.charge_id)
    if charge is None:
        return
    plate = mask_plate_for_message(charge.plate)
    if type_ == EventType.charge_captured:
        kind, key = NotificationKind.charge_captured, f"charge_captured:{charge.id}"
        title, body = texts.captured(plate, charge.lot_code, data.amount_fen)
    else:
        # Each attempt that fails is news (a retry after paying arrears may fail again); the
        # event id names the attempt.
        kind, key = NotificationKind.charge_declined, f"charge_declined:{event_id}"
        title, body = texts.declined(plate, charge.lot_code, data.amount_fen, data.failure_code)
    notifications.notify(
        db,
        driver_id=data.driver_id,
        kind=kind,
        key=key,
        title=title,
        body=body,
        plate=plate,
        amount_fen=data.amount_fen,
        ref_id=charge.id,
    )


def _account(db: Session, data: AccountUpdated) -> None:
    watch = db.get(PostpayWatch, data.driver_id)
    if watch is not None and watch.version >= data.version:
        return  # an older snapshot than the one already seen
    before = watch.postpay if watch is not None else None
    if watch is None:
        db.add(PostpayWatch(driver_id=data.driver_id, version=data.version, postpay=data.postpay))
    else:
        watch.version, watch.postpay = data.version, data.postpay
    db.flush()
    if data.postpay == PostpayStatus.suspended and before != PostpayStatus.suspended:
        kind, (title, body) = NotificationKind.suspended, texts.suspended()
    elif data.postpay == PostpayStatus.active and before == PostpayStatus.suspended:
        kind, (title, body) = NotificationKind.restored, texts.restored()
    else:
        return
    notifications.notify(
        db,
        driver_id=data.driver_id,
        kind=kind,
        key=f"{kind}:{data.driver_id}:{data.version}",
        title=title,
        body=body,
    )


def _refund(db: Session, data: RefundEvent) -> None:
    charge = db.get(Charge, data.charge_id)
    if charge is None:
        return
    plate = mask_plate_for_message(charge.plate)
    title, body = texts.refund(plate, charge.lot_code, data.amount_fen, data.credit_invoice_number)
    notifications.notify(
        db,
        driver_id=data.driver_id,
        kind=NotificationKind.refund,
        key=f"refund:{data.refund_id}",
        title=title,
        body=body,
        plate=plate,
        amount_fen=data.amount_fen,
        ref_id=data.refund_id,
    )


def handler(settings: Settings) -> Callable[[Session, Message], None]:
    def handle(db: Session, message: Message) -> None:
        event, type_ = message.event, message.event.type
        if type_ == EventType.parking_entry:
            _entry(db, settings, ParkingEvent.opened(settings, event.data))
        elif type_ == EventType.session_closed:
            _exit(db, SessionClosed.opened(settings, event.data), event.time)
        elif type_ in (EventType.charge_captured, EventType.charge_declined):
            _charge(db, event.id, type_, ChargeEvent.model_validate(event.data))
        elif type_ == EventType.account_updated:
            _account(db, AccountUpdated.model_validate(event.data))
        elif type_ == EventType.refund_succeeded:
            _refund(db, RefundEvent.model_validate(event.data))

    return handle


def consumer(rt: Runtime, topics: Sequence[str] = TOPICS, group: str = GROUP) -> Worker:
    # Every effect is a row in billing's database (the delivery worker sends them later), so a
    # poll is taken in one transaction.
    inner = idempotent(rt.sessionmaker, group, handler(rt.settings), batch=True)
    assert isinstance(inner, BatchHandler)

    # Most parking events are of no driver's concern: they skip the inbox altogether.
    def relevant_one(message: Message) -> None:
        if message.event.type in RELEVANT:
            inner(message)

    def relevant_many(messages: list[Message]) -> None:
        if wanted := [m for m in messages if m.event.type in RELEVANT]:
            inner.batch(wanted)

    handle = BatchHandler(relevant_one, relevant_many)

    def run(stop: threading.Event) -> None:
        sub = make_subscription(rt.settings, rt.sessionmaker, group, list(topics))
        ConsumerLoop(
            group, sub, handle, stop=stop, dead_letter=dead_letter_to_db(rt.sessionmaker, group)
        ).run()

    return run


def channels(rt: Runtime) -> dict[Channel, NotificationChannel]:
    return {
        Channel.sms: SmsSandbox(),
        Channel.webhook: WebhookChannel(rt.secret, UrlGuard.from_runtime(rt)),
    }


def delivery_worker(rt: Runtime) -> Worker:
    chans = channels(rt)

    def run(stop: threading.Event) -> None:
        while not stop.is_set():
            tried = 0
            try:
                tried = notifications.process_due(rt.sessionmaker, chans)
            except Exception:
                log.exception("notification.worker_failed")
            if not tried:
                stop.wait(0.2)

    return run


def workers(rt: Runtime) -> list[Worker]:
    return [consumer(rt), delivery_worker(rt)]
