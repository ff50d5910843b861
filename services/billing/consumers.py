"""Billing consumes closed sessions; the charge worker talks to the provider afterwards."""

from __future__ import annotations

import threading

from sqlalchemy.orm import Session

from services.billing.charge import service as charges
from shared.bus.consumer import ConsumerLoop, dead_letter_to_db, idempotent
from shared.bus.factory import make_subscription
from shared.bus.outbox import run_relay
from shared.bus.port import Message
from shared.events import SessionClosed
from shared.runtime import Runtime, Worker
from shared.settings import BusKind
from shared.topics import SESSIONS_CLOSED

GROUP = "citypark-billing"


def workers(rt: Runtime) -> list[Worker]:
    def handle(db: Session, message: Message) -> None:
        charges.open_charge(
            db, rt.internal("lots"), SessionClosed.model_validate(message.event.data)
        )

    def consume(stop: threading.Event) -> None:
        sub = make_subscription(rt.settings, rt.sessionmaker, GROUP, [SESSIONS_CLOSED])
        ConsumerLoop(
            GROUP,
            sub,
            idempotent(rt.sessionmaker, GROUP, handle),
            stop=stop,
            dead_letter=dead_letter_to_db(rt.sessionmaker, GROUP),
        ).run()

    def charge_worker(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                touched = charges.process_due(rt.sessionmaker, rt.settings, rt.providers)
            except Exception:
                charges.log.exception("charge.worker_failed")
                touched = 0
            if not touched:
                stop.wait(0.2)

    out: list[Worker] = [consume, charge_worker]
    if rt.settings.bus is BusKind.kafka:
        out.append(lambda stop: run_relay(rt.sessionmaker, rt.bus, charges.SOURCE, stop))
    return out
