"""The lots service follows parking events (live occupancy) and closed sessions (parkings served
per district and day), in its own consumer group."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import redis
from sqlalchemy.orm import Session

from services.lots import occupancy
from shared.bus.consumer import ConsumerLoop, dead_letter_to_db, idempotent
from shared.bus.factory import make_subscription
from shared.bus.port import Message
from shared.events import EventType, ParkingEvent, SessionClosed
from shared.runtime import Runtime, Worker
from shared.topics import PARKING_EVENTS, SESSIONS_CLOSED

GROUP = "citypark-lots"
TOPICS: tuple[str, ...] = (PARKING_EVENTS, SESSIONS_CLOSED)


def handler(r: redis.Redis) -> Callable[[Session, Message], None]:
    def handle(db: Session, message: Message) -> None:
        # Dispatch on the event type, not the topic: one handler whatever the topics are named.
        kind = message.event.type
        if kind in (EventType.parking_entry, EventType.parking_exit):
            occupancy.apply_event(db, r, ParkingEvent.model_validate(message.event.data))
        elif kind == EventType.session_closed:
            occupancy.count_parking(db, SessionClosed.model_validate(message.event.data))

    return handle


def workers(rt: Runtime, *, group: str = GROUP, topics: Sequence[str] = TOPICS) -> list[Worker]:
    def consume(stop: threading.Event) -> None:
        sub = make_subscription(rt.settings, rt.sessionmaker, group, list(topics))
        ConsumerLoop(
            group,
            sub,
            idempotent(rt.sessionmaker, group, handler(rt.redis)),
            stop=stop,
            dead_letter=dead_letter_to_db(rt.sessionmaker, group),
        ).run()

    return [consume]
