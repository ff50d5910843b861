"""Pairing entries and exits on PostgreSQL: duplicates, reordering, stale entries."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.sessions.models import ParkingSession, SessionStatus
from services.sessions.service import handle_parking_event
from shared.bus.models import LogRow
from shared.events import Decision, EventType, ParkingEvent, session_id_for
from shared.settings import Settings
from shared.topics import SESSIONS_CLOSED

# Only the data keys matter here: the closing events carry the plate sealed with them.
KEYS = Settings(jwt_secret=SecretStr("integration-secret-long-enough-for-hs256"))

pytestmark = pytest.mark.integration
T0 = datetime(2026, 11, 25, 1, 0, tzinfo=UTC)


def ev(lot: str, kind: str, at: datetime, plate: str = "苏E12345", **kw: object) -> ParkingEvent:
    return ParkingEvent(
        event_id=str(uuid.uuid4()),
        kind=kind,
        lot_id=lot,
        lot_code="L",
        district="gusu",
        operator_id="op",
        plate=plate,
        plate_color="blue",
        occurred_at=at,
        received_at=at,
        **kw,
    )  # type: ignore[arg-type]


def apply(factory: sessionmaker[Session], e: ParkingEvent) -> None:
    kind = EventType.parking_entry if e.kind == "entry" else EventType.parking_exit
    with factory() as db, db.begin():
        handle_parking_event(db, kind, e, KEYS)


def sessions_at(factory: sessionmaker[Session], lot: str) -> list[ParkingSession]:
    with factory() as db:
        return list(
            db.scalars(
                select(ParkingSession)
                .where(ParkingSession.lot_id == lot)
                .order_by(ParkingSession.entered_at)
            )
        )


def closings(factory: sessionmaker[Session], session_id: str) -> int:
    with factory() as db:
        return len(
            db.scalars(
                select(LogRow).where(
                    LogRow.topic == SESSIONS_CLOSED,
                    LogRow.event_id == f"session-closed-{session_id}",
                )
            ).all()
        )


def test_entry_then_exit_closes_one_session_and_publishes_once(
    factory: sessionmaker[Session],
) -> None:
    lot = str(uuid.uuid4())
    entry = ev(lot, "entry", T0, driver_id="d1")
    exit_ = ev(lot, "exit", T0 + timedelta(hours=2), decision=Decision.postpay, driver_id="d1")
    apply(factory, entry)
    apply(factory, exit_)
    apply(factory, exit_)  # the exit delivered again
    [s] = sessions_at(factory, lot)
    assert s.id == session_id_for(lot, entry.event_id)
    assert (s.status, s.decision, s.exited_at) == (
        SessionStatus.closed,
        "postpay",
        T0 + timedelta(hours=2),
    )
    assert closings(factory, s.id) == 1


def test_exit_before_its_entry_is_paired_when_the_entry_arrives(
    factory: sessionmaker[Session],
) -> None:
    lot = str(uuid.uuid4())
    apply(factory, ev(lot, "exit", T0 + timedelta(hours=1), decision=Decision.pay_on_site))
    assert sessions_at(factory, lot) == []
    apply(factory, ev(lot, "entry", T0))
    [s] = sessions_at(factory, lot)
    assert s.status == SessionStatus.closed
    assert s.exited_at == T0 + timedelta(hours=1)
    assert closings(factory, s.id) == 1


def test_a_second_entry_abandons_the_open_session_and_a_stale_one_is_ignored(
    factory: sessionmaker[Session],
) -> None:
    lot = str(uuid.uuid4())
    apply(factory, ev(lot, "entry", T0))
    apply(factory, ev(lot, "entry", T0 + timedelta(hours=3)))
    apply(factory, ev(lot, "entry", T0 + timedelta(hours=1)))  # late and older: ignored
    statuses = [s.status for s in sessions_at(factory, lot)]
    assert statuses == [SessionStatus.abandoned, SessionStatus.open]


def test_vehicles_are_paired_separately(factory: sessionmaker[Session]) -> None:
    lot = str(uuid.uuid4())
    apply(factory, ev(lot, "entry", T0, plate="苏E11111"))
    apply(factory, ev(lot, "entry", T0, plate="苏E22222"))
    apply(factory, ev(lot, "exit", T0 + timedelta(minutes=30), plate="苏E22222"))
    by_plate = {s.plate: s.status for s in sessions_at(factory, lot)}
    assert by_plate == {"苏E11111": SessionStatus.open, "苏E22222": SessionStatus.closed}
