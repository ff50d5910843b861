"""Notifications: one per source event and driver (the dedupe key derives from the event), not
made at all for a kind the driver muted, then delivered through each channel at least once.

A notification and its deliveries are written in the transaction that consumes the source
event; the delivery worker sends them afterwards (`SELECT … FOR UPDATE SKIP LOCKED`, backoff,
a final `failed` after MAX_ATTEMPTS). A crash between a send and its commit sends again: at
least once, never lost.
"""

from __future__ import annotations

from datetime import timedelta

import structlog
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from services.billing.driver.models import Driver
from services.billing.notification.models import (
    Channel,
    Delivery,
    DeliveryStatus,
    Notification,
    NotificationKind,
    Preference,
    Webhook,
)
from services.billing.notification.port import DeliveryFailed, NotificationChannel
from services.billing.notification.urlguard import UrlGuard
from shared import workqueue
from shared.db import new_id as _new_id
from shared.errors import NotFound
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)
MAX_ATTEMPTS = 12
MAX_BACKOFF = timedelta(minutes=30)
LEASE = timedelta(seconds=30)  # longer than a webhook's 5 s timeout


def muted_kinds(db: Session, driver_id: str) -> set[NotificationKind]:
    pref = db.get(Preference, driver_id)
    if pref is None:
        return set()
    return {NotificationKind(k) for k in pref.settings.get("muted", [])}


def set_muted(db: Session, driver_id: str, kinds: list[NotificationKind]) -> list[NotificationKind]:
    muted = sorted(set(kinds))
    pref = db.get(Preference, driver_id)
    if pref is None:
        db.add(Preference(driver_id=driver_id, settings={"muted": [str(k) for k in muted]}))
    else:
        pref.settings = {"muted": [str(k) for k in muted]}
    db.flush()
    return muted


def notify(
    db: Session,
    *,
    driver_id: str,
    kind: NotificationKind,
    key: str,
    title: str,
    body: str,
    plate: str | None = None,
    amount_fen: int | None = None,
    ref_id: str | None = None,
) -> Notification | None:
    """Record a notification and queue its deliveries; None when muted or already made."""
    driver = db.get(Driver, driver_id)
    if driver is None or driver.erased_at is not None:  # an erased driver has no one to tell
        return None
    if kind in muted_kinds(db, driver_id):
        log.info("notification.muted", driver_id=driver_id, kind=str(kind))
        return None
    dialect = db.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(Notification)
        .values(
            id=_new_id(),
            driver_id=driver_id,
            kind=str(kind),
            dedupe_key=key,
            title=title,
            body=body,
            plate=plate,
            amount_fen=amount_fen,
            ref_id=ref_id,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing()
        .returning(Notification.id)
    )
    new_id = db.execute(stmt).scalar()
    if new_id is None:
        log.debug("notification.duplicate", driver_id=driver_id, key=key)
        return None
    db.add(Delivery(notification_id=new_id, channel=Channel.sms, target=driver.phone))
    hook = db.get(Webhook, driver_id)
    if hook is not None:
        db.add(
            Delivery(
                notification_id=new_id, channel=Channel.webhook, target=f"{hook.id} {hook.url}"
            )
        )
    db.flush()
    log.info("notification.created", driver_id=driver_id, kind=str(kind), key=key)
    return db.get(Notification, new_id)


def list_for(db: Session, driver_id: str, limit: int = 50) -> list[Notification]:
    return list(
        db.scalars(
            select(Notification)
            .where(Notification.driver_id == driver_id)
            .order_by(Notification.created_at.desc(), Notification.id)
            .limit(limit)
        )
    )


def deliveries_of(db: Session, notification_ids: list[str]) -> dict[str, list[Delivery]]:
    out: dict[str, list[Delivery]] = {i: [] for i in notification_ids}
    if notification_ids:
        for d in db.scalars(
            select(Delivery)
            .where(Delivery.notification_id.in_(notification_ids))
            .order_by(Delivery.channel)
        ):
            out[d.notification_id].append(d)
    return out


def register_webhook(db: Session, driver_id: str, url: str, guard: UrlGuard) -> Webhook:
    """The driver's one webhook; registering again replaces the URL and the secret. A URL that
    does not lead to the public internet is refused (`urlguard`)."""
    guard.check(url)
    existing = db.get(Webhook, driver_id)
    if existing is not None:
        db.delete(existing)
        db.flush()
    hook = Webhook(driver_id=driver_id, id=_new_id(), url=url)
    db.add(hook)
    db.flush()
    return hook


def get_webhook(db: Session, driver_id: str) -> Webhook:
    hook = db.get(Webhook, driver_id)
    if hook is None:
        raise NotFound("No webhook is registered")
    return hook


def remove_webhook(db: Session, driver_id: str) -> None:
    db.delete(get_webhook(db, driver_id))
    db.flush()


def _backoff(delivery: Delivery, error: str) -> None:
    delivery.attempts += 1
    delivery.last_error = error[:300]
    if delivery.attempts >= MAX_ATTEMPTS:
        delivery.status = DeliveryStatus.failed
        log.warning("notification.delivery_failed", delivery_id=delivery.id, error=error)
        return
    delivery.next_attempt_at = utcnow() + min(
        timedelta(seconds=2 ** min(delivery.attempts, 12)), MAX_BACKOFF
    )


def deliver(db: Session, channels: dict[Channel, NotificationChannel], delivery: Delivery) -> None:
    """Send one delivery once, inside the caller's transaction (tests and tools; the worker
    uses `process_due`, which sends network deliveries with no transaction open)."""
    notification = db.get(Notification, delivery.notification_id)
    channel = channels.get(delivery.channel)
    if notification is None or channel is None:
        delivery.status = DeliveryStatus.failed
        delivery.last_error = "no such notification or channel"
        return
    try:
        channel.send(db, notification, delivery.target)
    except DeliveryFailed as exc:
        _backoff(delivery, str(exc))
        return
    _delivered(delivery)


def _delivered(delivery: Delivery) -> None:
    delivery.attempts += 1
    delivery.status = DeliveryStatus.delivered
    delivery.delivered_at = utcnow()
    delivery.last_error = None


_strikes = workqueue.Strikes()


def _step(
    factory: sessionmaker[Session], channels: dict[Channel, NotificationChannel], did: str
) -> None:
    with factory() as db, db.begin():
        delivery = workqueue.locked(db, Delivery, did)
        if delivery is None or delivery.status != DeliveryStatus.pending:
            return
        channel = channels.get(delivery.channel)
        if channel is None or getattr(channel, "writes_to_db", True):
            deliver(db, channels, delivery)
            return
        notification = db.get(Notification, delivery.notification_id)
        if notification is None:
            deliver(db, channels, delivery)  # marks it failed
            return
        db.expunge(notification)  # read; sent below with no transaction (and no lock) open
        target = delivery.target
    try:
        channel.send(None, notification, target)
        error = None
    except DeliveryFailed as exc:
        error = str(exc)
    with factory() as db, db.begin():
        delivery = workqueue.locked(db, Delivery, did)
        if delivery is None or delivery.status != DeliveryStatus.pending:
            return
        if error is None:
            _delivered(delivery)
        else:
            _backoff(delivery, error)


def _park(delivery: Delivery, exc: Exception) -> None:
    delivery.status = DeliveryStatus.parked
    delivery.last_error = repr(exc)[:300]


def process_due(
    factory: sessionmaker[Session], channels: dict[Channel, NotificationChannel], limit: int = 50
) -> int:
    """Claim due deliveries (a lease), send each, record each answer in its own transaction;
    returns how many were taken. Replicas share the work without sending one twice."""
    return workqueue.run_due(
        factory,
        Delivery,
        Delivery.status == DeliveryStatus.pending,
        lambda did: _step(factory, channels, did),
        queue="deliveries",
        strikes=_strikes,
        is_open=lambda d: d.status == DeliveryStatus.pending,
        park=_park,
        lease=LEASE,
        limit=limit,
    )


def replay_parked(db: Session, delivery_id: str) -> Delivery:
    """Put a parked delivery back in the queue."""
    delivery = workqueue.locked(db, Delivery, delivery_id)
    if delivery is None or delivery.status != DeliveryStatus.parked:
        raise NotFound("No parked delivery with this id")
    delivery.status = DeliveryStatus.pending
    delivery.next_attempt_at = utcnow()
    _strikes.clear(delivery.id)
    log.info("notification.replayed", delivery_id=delivery.id)
    return delivery
