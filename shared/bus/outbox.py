"""Transactional outbox: a service writes its events in the same transaction as its state.

In the embedded default the outbox table is the log consumers read; with Kafka a relay
publishes the rows after commit and marks them relayed.
"""

from __future__ import annotations

import threading

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared import wakeups
from shared.bus.models import LogRow
from shared.bus.port import EventBus
from shared.events import CloudEvent
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)

# A relay sleeps until a transaction of its own process commits outbox rows, or `RELAY_IDLE_S`
# passes (rows another replica or a crashed run left): ten district adapters polling every
# 50 ms kept a third of a core busy doing nothing.
RELAY_IDLE_S = 1.0


def _relay_wakeup(source: str) -> str:
    return f"outbox:{source}"


LOG_APPENDED = "bus:log-appended"  # wakes the embedded log's consumers when rows commit


def enqueue(db: Session, *, source: str, topic: str, key: str, event: CloudEvent) -> None:
    db.add(
        LogRow(
            source=source, topic=topic, key=key, event_id=event.id, payload=event.model_dump_json()
        )
    )
    wakeups.after_commit(db, _relay_wakeup(source))
    wakeups.after_commit(db, LOG_APPENDED)


def relay_once(factory: sessionmaker[Session], bus: EventBus, source: str, batch: int = 200) -> int:
    """Publish pending rows of one service to the bus; returns how many went out."""
    with factory() as db, db.begin():
        query = (
            select(LogRow)
            .where(LogRow.source == source, LogRow.relayed_at.is_(None))
            .order_by(LogRow.id)
            .limit(batch)
        )
        if db.get_bind().dialect.name == "postgresql":
            # Several replicas of a service may relay at once; each row goes out once.
            query = query.with_for_update(skip_locked=True)
        rows = list(db.scalars(query))
        if not rows:
            return 0
        bus.publish_many([(r.topic, r.key, CloudEvent.from_json(r.payload)) for r in rows])
        now = utcnow()
        for r in rows:
            r.relayed_at = now
        return len(rows)


def run_relay(
    factory: sessionmaker[Session],
    bus: EventBus,
    source: str,
    stop: threading.Event,
    idle_s: float = RELAY_IDLE_S,
) -> None:
    log.info("relay.started", source=source)
    woken = wakeups.wakeup(_relay_wakeup(source))
    while not stop.is_set():
        woken.clear()  # before reading: a commit from now on is seen by this round or the next
        try:
            sent = relay_once(factory, bus, source)
        except Exception:
            # Kafka or the database is away: the rows stay pending; try again shortly.
            log.exception("relay.failed", source=source)
            stop.wait(1.0)
            continue
        if not sent:
            woken.wait(idle_s)
    log.info("relay.stopped", source=source)
