"""Billing's retention: sign-in and phone-change codes and the sandbox SMS outbox after
`retention_signin_days`, notifications (with their deliveries) after
`retention_notifications_days`. Money records (charges, refunds, invoices, the ledger) are
kept `retention_money_years` and never purged here; erased drivers' are anonymised at once.

Each run also asks the sessions service again to drop the links of recently erased drivers'
parkings, in case it could not be reached when they were erased (it is idempotent)."""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from services.billing.driver.models import Driver, OtpChallenge, SmsMessage
from services.billing.notification.models import Delivery, Notification
from services.billing.rights import service as rights
from shared import retention
from shared.retention import Step, count, days_ago, delete_batch
from shared.runtime import Runtime, Worker
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)

# How long after an erasure the parkings' erasure is asked for again.
PARKINGS_RETRY_DAYS = 7


def _notifications_batch(db: Session, cutoff: datetime, size: int) -> int:
    ids = list(
        db.scalars(select(Notification.id).where(Notification.created_at < cutoff).limit(size))
    )
    if ids:
        db.execute(delete(Delivery).where(Delivery.notification_id.in_(ids)))
        db.execute(delete(Notification).where(Notification.id.in_(ids)))
    return len(ids)


def steps() -> list[Step]:
    codes = days_ago("retention_signin_days")
    return [
        *retention.bus_steps(),  # the bus tables of this service's database
        Step(
            "signin_codes",
            codes,
            lambda db, c: count(db, select(OtpChallenge.id).where(OtpChallenge.created_at < c)),
            lambda db, c, n: delete_batch(
                db, OtpChallenge, OtpChallenge.id, OtpChallenge.created_at < c, size=n
            ),
        ),
        Step(
            "sms",
            codes,
            lambda db, c: count(db, select(SmsMessage.id).where(SmsMessage.sent_at < c)),
            lambda db, c, n: delete_batch(
                db, SmsMessage, SmsMessage.id, SmsMessage.sent_at < c, size=n
            ),
        ),
        Step(
            "notifications",
            days_ago("retention_notifications_days"),
            lambda db, c: count(db, select(Notification.id).where(Notification.created_at < c)),
            _notifications_batch,
        ),
    ]


def retry_parkings(rt: Runtime) -> int:
    """Erase the parkings of drivers erased lately again; how many drivers were asked for."""
    since = utcnow() - timedelta(days=PARKINGS_RETRY_DAYS)
    with rt.read_sessionmaker() as db, db.begin():
        erased = list(db.scalars(select(Driver.id).where(Driver.erased_at >= since)))
    for driver_id in erased:  # no transaction open while the sessions service is asked
        rights.erase_parkings(rt, driver_id)
    return len(erased)


def purge(rt: Runtime, *, dry_run: bool = False) -> dict[str, int]:
    counts = retention.run_steps(rt, steps(), dry_run=dry_run)
    if not dry_run:
        try:
            counts["erased_drivers_rechecked"] = retry_parkings(rt)
        except Exception as exc:  # the sessions service is away: next run
            log.warning("retention.parkings_retry_failed", error=repr(exc)[:200])
    return counts


def worker(rt: Runtime) -> Worker:
    return retention.periodic(rt, "billing", lambda: purge(rt))
