"""Billing consumes closed sessions; the money worker talks to the provider afterwards
(charges, then refunds) and, now and then, suspends drivers whose arrears got too old."""

from __future__ import annotations

import threading
import time

from sqlalchemy.orm import Session

from services.billing.charge import service as charges
from services.billing.notification import consumers as notification_consumers
from services.billing.refund import service as refunds
from shared.bus.consumer import ConsumerLoop, dead_letter_to_db, idempotent
from shared.bus.factory import make_subscription
from shared.bus.outbox import run_relay
from shared.bus.port import Message
from shared.events import SessionClosed
from shared.runtime import Runtime, Worker
from shared.settings import BusKind
from shared.topics import SESSIONS_CLOSED

GROUP = "citypark-billing"
CHARGE_WORKERS = 4


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

    def charge_worker(stop: threading.Event, sweeper: bool = True) -> None:
        next_sweep = 0.0
        while not stop.is_set():
            touched = 0
            try:
                touched += charges.process_due(rt.sessionmaker, rt.settings, rt.providers)
                if not sweeper:
                    if not touched:
                        stop.wait(0.2)
                    continue
                touched += refunds.process_due(rt.sessionmaker, rt.providers)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + rt.settings.arrears_sweep_interval_s
                    with rt.sessionmaker() as db, db.begin():
                        charges.sweep_arrears(db, rt.settings)
            except Exception:
                charges.log.exception("charge.worker_failed")
            if not touched:
                stop.wait(0.2)

    out: list[Worker] = [consume, charge_worker]
    if rt.engine.dialect.name == "postgresql":
        # The provider's answer takes milliseconds: more workers keep charges flowing; the
        # queue claims rows with SKIP LOCKED, so they never share one (SQLite keeps one).
        out += [lambda stop: charge_worker(stop, sweeper=False)] * (CHARGE_WORKERS - 1)
    out += notification_consumers.workers(rt)  # their own consumer group, and the sender
    if rt.settings.bus is BusKind.kafka:
        out.append(lambda stop: run_relay(rt.sessionmaker, rt.bus, charges.SOURCE, stop))
    return out
