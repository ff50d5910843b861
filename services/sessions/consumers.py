"""Sessions consume canonical parking events and publish closed sessions through the outbox."""

from __future__ import annotations

import threading

from sqlalchemy.orm import Session

from services.sessions.service import SOURCE, handle_parking_event
from shared.bus.consumer import ConsumerLoop, dead_letter_to_db, idempotent
from shared.bus.factory import make_subscription
from shared.bus.outbox import run_relay
from shared.bus.port import Message
from shared.events import ParkingEvent
from shared.runtime import Runtime, Worker
from shared.settings import BusKind
from shared.topics import PARKING_EVENTS

GROUP = "citypark-sessions"


def workers(rt: Runtime) -> list[Worker]:
    def _handle(db: Session, message: Message) -> None:
        event = ParkingEvent.opened(rt.settings, message.event.data)
        handle_parking_event(db, message.event.type, event, rt.settings)

    def consume(stop: threading.Event) -> None:
        sub = make_subscription(rt.settings, rt.sessionmaker, GROUP, [PARKING_EVENTS])
        ConsumerLoop(
            GROUP,
            sub,
            idempotent(rt.sessionmaker, GROUP, _handle, batch=True),
            stop=stop,
            dead_letter=dead_letter_to_db(rt.sessionmaker, GROUP),
        ).run()

    out: list[Worker] = [consume]
    if rt.settings.bus is BusKind.kafka:
        out.append(lambda stop: run_relay(rt.sessionmaker, rt.bus, SOURCE, stop))
    return out
