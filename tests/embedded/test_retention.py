"""Retention in the embedded city: each service's purge removes (or pseudonymises) what is past
its period, keeps what is not, and a second run finds nothing left to do."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from services.billing import retention as billing_retention
from services.billing.driver.models import Driver, OtpChallenge, SmsMessage
from services.billing.notification.models import (
    Channel,
    Delivery,
    Notification,
    NotificationKind,
)
from services.sessions import retention as sessions_retention
from services.sessions.models import ParkingSession, SessionStatus
from shared import pii
from shared.bus.models import DeadLetter, InboxRow
from shared.db import transaction
from shared.runtime import Runtime
from shared.timeutil import utcnow
from tests.embedded_city import embedded_city


def _session(
    plate: str, at: datetime, driver_id: str | None, status: SessionStatus
) -> ParkingSession:
    return ParkingSession(
        lot_id="lot",
        lot_code="L1",
        district="gusu",
        operator_id="op",
        plate=plate,
        plate_color="blue",
        vehicle_type="small",
        driver_id=driver_id,
        status=status,
        entry_event_id=f"lot/{uuid.uuid4()}",
        entered_at=at,
        exited_at=at + timedelta(hours=1) if status != SessionStatus.open else None,
    )


def _purge_all(rt: Runtime) -> Counter[str]:
    """Both services' counts, added up (each also purges its database's bus tables)."""
    counts: Counter[str] = Counter()
    for purge in (billing_retention.purge, sessions_retention.purge):
        counts.update(purge(rt))
    return counts


def test_purge_removes_what_is_past_its_period_and_keeps_the_rest(tmp_path: Path) -> None:
    with embedded_city(tmp_path / "city.db") as client:
        rt: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
        now = utcnow()
        old_day, old_half_year, old_month = (
            now - timedelta(days=2),
            now - timedelta(days=181),
            now - timedelta(days=31),
        )
        with transaction(rt.sessionmaker) as db:
            driver = Driver(phone="13700000001")
            db.add(driver)
            db.flush()
            for at, tag in ((old_day, "old"), (now, "new")):
                db.add(
                    OtpChallenge(
                        id=f"{tag}.{uuid.uuid4().hex[:20]}",
                        phone="13700000001",
                        code_hash="x",
                        expires_at=at + timedelta(minutes=5),
                        created_at=at,
                    )
                )
                db.add(SmsMessage(phone="13700000001", body=tag, sent_at=at))
            for at, tag in ((old_half_year, "old"), (now, "new")):
                note = Notification(
                    driver_id=driver.id,
                    kind=NotificationKind.exit,
                    dedupe_key=tag,
                    title=tag,
                    body=tag,
                    created_at=at,
                )
                db.add(note)
                db.flush()
                db.add(Delivery(notification_id=note.id, channel=Channel.sms, target="x"))
            db.add(_session("苏E00001", old_half_year, driver.id, SessionStatus.closed))
            db.add(_session("苏E00002", now - timedelta(days=10), driver.id, SessionStatus.closed))
            db.add(_session("苏E00003", old_half_year, None, SessionStatus.open))
            db.add(InboxRow(consumer="c", event_id="old", seen_at=old_month))
            db.add(InboxRow(consumer="c", event_id="new", seen_at=now))
            for at in (old_month, now):
                db.add(
                    DeadLetter(
                        consumer="c", topic="t", event_id="e", payload="{}", error="x", at=at
                    )
                )

        due = billing_retention.purge(rt, dry_run=True)
        assert (due["signin_codes"], due["sms"], due["notifications"]) == (1, 1, 1)
        assert sessions_retention.purge(rt, dry_run=True)["session_plates"] == 1

        first = _purge_all(rt)
        assert first["signin_codes"] == 1
        assert first["sms"] == 1
        assert first["notifications"] == 1
        assert first["session_plates"] == 1
        assert first["bus_inbox"] == 1
        assert first["dead_letters"] == 1

        with rt.sessionmaker() as db:
            assert [c.id.split(".")[0] for c in db.scalars(select(OtpChallenge))] == ["new"]
            # (the running city also texts the seeded notifications meanwhile: only the seeded
            # messages themselves are looked at)
            seeded = [m.body for m in db.scalars(select(SmsMessage))]
            assert [b for b in seeded if b in ("old", "new")] == ["new"]
            assert [n.title for n in db.scalars(select(Notification))] == ["new"]
            assert len(list(db.scalars(select(Delivery)))) == 1
            assert len(list(db.scalars(select(InboxRow)))) == 1
            assert len(list(db.scalars(select(DeadLetter)))) == 1
            rows = list(db.scalars(select(ParkingSession)))
            old = next(
                s for s in rows if s.status == "closed" and s.entered_at < now - timedelta(days=100)
            )
            assert old.plate == pii.plate_ref(rt.settings, "苏E00001", "blue")
            assert old.driver_id is None
            assert old.pseudonymised_at is not None
            recent = next(s for s in rows if s.plate == "苏E00002")
            assert recent.driver_id == driver.id  # within its period: untouched
            still_open = next(s for s in rows if s.status == "open")
            assert still_open.plate == "苏E00003"  # an open parking is never rewritten

        again = _purge_all(rt)
        assert {k: v for k, v in again.items() if k != "erased_drivers_rechecked"} == dict.fromkeys(
            again.keys() - {"erased_drivers_rechecked"}, 0
        )
