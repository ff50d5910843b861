"""Billing consumes closed sessions; the money worker talks to the provider afterwards
(charges, then refunds) and, now and then, suspends drivers whose arrears got too old."""

from __future__ import annotations

import threading
import time

from services.billing.charge import service as charges
from services.billing.notification import consumers as notification_consumers
from services.billing.refund import service as refunds
from shared import wakeups
from shared.bus.consumer import (
    BatchHandler,
    ConsumerLoop,
    dead_letter_to_db,
    first_time,
    first_times,
)
from shared.bus.factory import make_subscription
from shared.bus.outbox import run_relay
from shared.bus.port import Message
from shared.events import SessionClosed
from shared.runtime import Runtime, Worker
from shared.settings import BusKind
from shared.topics import SESSIONS_CLOSED

GROUP = "citypark-billing"
# New charges wake the workers at once; this only paces retries that fall due with time
# (backoff starts at 2 s) and refunds, which are rare.
IDLE_S = 1.0
SQLITE_CHARGE_WORKERS = 3


def closed_sessions_handler(rt: Runtime) -> BatchHandler:
    """Charges from closed sessions, idempotent on the event id. A whole poll is priced in one
    call to lots and opened in one transaction; a poll holding a poison message falls back to
    one message (one price call, one transaction) at a time."""

    def one(message: Message) -> None:
        closed = SessionClosed.opened(rt.settings, message.event.data)
        lots = rt.internal("lots")
        # Priced before the transaction: no write lock is held while lots answers.
        price = charges.prices_for(lots, [closed]).get(closed.session_id)
        with rt.sessionmaker() as db, db.begin():
            if first_time(db, GROUP, message.event.id):
                charges.open_charge(db, lots, closed, price)

    def many(messages: list[Message]) -> None:
        closed = [SessionClosed.opened(rt.settings, m.event.data) for m in messages]
        # Asked before the transaction: lots is read, never written, so a retried poll
        # only asks again.
        lots = rt.internal("lots")  # looked up late: the embedded city wires it after start
        prices = charges.prices_for(lots, closed)
        with rt.sessionmaker() as db, db.begin():
            fresh = first_times(db, GROUP, [m.event.id for m in messages])
            for message, session in zip(messages, closed, strict=True):
                if message.event.id in fresh:
                    fresh.discard(message.event.id)  # a repeat inside the poll counts once
                    charges.open_charge(db, lots, session, prices.get(session.session_id))

    return BatchHandler(one, many)


def workers(rt: Runtime) -> list[Worker]:
    def consume(stop: threading.Event) -> None:
        sub = make_subscription(rt.settings, rt.sessionmaker, GROUP, [SESSIONS_CLOSED])
        ConsumerLoop(
            GROUP,
            sub,
            closed_sessions_handler(rt),
            stop=stop,
            dead_letter=dead_letter_to_db(rt.sessionmaker, GROUP),
        ).run()

    def charge_worker(stop: threading.Event, sweeper: bool = True) -> None:
        next_sweep = 0.0
        due = wakeups.wakeup(charges.DUE)
        while not stop.is_set():
            due.clear()  # before looking: a charge opened from now on wakes the next wait
            touched = 0
            try:
                touched += charges.process_due(rt.sessionmaker, rt.settings, rt.providers)
                if not sweeper:
                    if not touched:
                        due.wait(IDLE_S)
                    continue
                touched += refunds.process_due(rt.sessionmaker, rt.providers)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + rt.settings.arrears_sweep_interval_s
                    with rt.sessionmaker() as db, db.begin():
                        charges.sweep_arrears(db, rt.settings)
            except Exception:
                charges.log.exception("charge.worker_failed")
                stop.wait(1.0)
            if not touched:
                due.wait(IDLE_S)

    out: list[Worker] = [consume, charge_worker]
    # Sending a charge is mostly waiting for the provider's answer, so the throughput of
    # charges is workers / provider latency: several workers keep them flowing. Each claims
    # its charges with a lease (SKIP LOCKED on PostgreSQL, the write lock on SQLite) and asks
    # the provider with no transaction open, so they never share one and never block writers.
    workers_n = rt.settings.billing_charge_workers
    if rt.engine.dialect.name == "sqlite":
        # One process, one interpreter lock: past a few, more workers only slow the rest.
        workers_n = min(workers_n, SQLITE_CHARGE_WORKERS)
    out += [lambda stop: charge_worker(stop, sweeper=False)] * (workers_n - 1)
    out += notification_consumers.workers(rt)  # their own consumer group, and the sender
    if rt.settings.bus is BusKind.kafka:
        out.append(lambda stop: run_relay(rt.sessionmaker, rt.bus, charges.SOURCE, stop))
    return out
