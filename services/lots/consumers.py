"""The lots service follows parking events (live occupancy) and closed sessions (parkings served
per district and day), in its own consumer group; and, in a second group, the audit events of
every service into the one audit log."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from datetime import date

from sqlalchemy.orm import Session

from services.lots import audit, occupancy
from services.lots.models import Lot, Occupancy
from shared.bus.consumer import (
    BatchHandler,
    ConsumerLoop,
    dead_letter_to_db,
    first_time,
    first_times,
)
from shared.bus.factory import make_subscription
from shared.bus.port import Message
from shared.events import EventType, ParkingEvent, SessionClosed
from shared.runtime import Runtime, Worker
from shared.topics import AUDIT_EVENTS, PARKING_EVENTS, SESSIONS_CLOSED

GROUP = "citypark-lots"
TOPICS: tuple[str, ...] = (PARKING_EVENTS, SESSIONS_CLOSED)
# A group of its own: a burst of parking events never holds up the log, nor the log them.
AUDIT_GROUP = "citypark-lots-audit"


def handler(rt: Runtime, group: str) -> BatchHandler:
    """Idempotent on the event id. A whole poll goes in one transaction: counts per lot under
    their row locks, one Redis write for all the lots it touched (just before commit, locks
    still held, as a single event's write is), one upsert per district and day."""
    r = rt.redis

    def apply(
        db: Session,
        message: Message,
        lots: dict[str, tuple[Lot, Occupancy]] | None,
        parkings: Counter[tuple[date, str]],
    ) -> None:
        # Dispatch on the event type, not the topic: one handler whatever the topics are named.
        kind = message.event.type
        if kind in (EventType.parking_entry, EventType.parking_exit):
            occupancy.apply_event(db, r, ParkingEvent.model_validate(message.event.data), lots)
        elif kind == EventType.session_closed:
            closed = SessionClosed.model_validate(message.event.data)
            parkings[occupancy.parking_day(closed)] += 1

    def one(message: Message) -> None:
        parkings: Counter[tuple[date, str]] = Counter()
        with rt.sessionmaker() as db, db.begin():
            if first_time(db, group, message.event.id):
                apply(db, message, None, parkings)
                occupancy.count_parkings(db, parkings)

    def many(messages: list[Message]) -> None:
        lots: dict[str, tuple[Lot, Occupancy]] = {}
        parkings: Counter[tuple[date, str]] = Counter()
        with rt.sessionmaker() as db, db.begin():
            fresh = first_times(db, group, [m.event.id for m in messages])
            for message in messages:
                if message.event.id in fresh:
                    fresh.discard(message.event.id)  # a repeat inside the poll counts once
                    apply(db, message, lots, parkings)
            occupancy.count_parkings(db, parkings)
            occupancy.mirror_all(r, lots.values())

    return BatchHandler(one, many)


def workers(rt: Runtime, *, group: str = GROUP, topics: Sequence[str] = TOPICS) -> list[Worker]:
    def consume(stop: threading.Event) -> None:
        sub = make_subscription(rt.settings, rt.sessionmaker, group, list(topics))
        ConsumerLoop(
            group,
            sub,
            handler(rt, group),
            stop=stop,
            dead_letter=dead_letter_to_db(rt.sessionmaker, group),
        ).run()

    return [consume]


def audit_handler(rt: Runtime) -> BatchHandler:
    """Idempotent on the event id through the log's unique index (no inbox row needed): a
    poll goes in one statement; an event that does not validate is dead-lettered by the loop."""

    def one(message: Message) -> None:
        with rt.sessionmaker() as db, db.begin():
            audit.store(db, [message.event])

    def many(messages: list[Message]) -> None:
        with rt.sessionmaker() as db, db.begin():
            audit.store(db, [m.event for m in messages])

    return BatchHandler(one, many)


def audit_workers(rt: Runtime, *, group: str = AUDIT_GROUP) -> list[Worker]:
    def consume(stop: threading.Event) -> None:
        sub = make_subscription(rt.settings, rt.sessionmaker, group, [AUDIT_EVENTS])
        ConsumerLoop(
            group,
            sub,
            audit_handler(rt),
            stop=stop,
            dead_letter=dead_letter_to_db(rt.sessionmaker, group),
        ).run()

    return [consume]
