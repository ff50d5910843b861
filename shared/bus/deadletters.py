"""Dead letters for ops: list them, and replay one or all once the cause is fixed.

A replay publishes the event again, under its own id, to the topic it came from (with its key,
so it keeps its place in the key's order). Only the consumer that set it aside has not applied
it: every other consumer group finds the id in its inbox and skips it, so a replay is safe to
repeat. A record that never was an event cannot be replayed: its raw bytes are kept to read.
"""

from __future__ import annotations

from datetime import datetime

import structlog
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.bus.models import DeadLetter
from shared.bus.port import EventBus
from shared.errors import NotFound, problem
from shared.events import CloudEvent
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)

DeadLetterUnknown = problem(404, "dead_letter_unknown", "No such dead letter")
DeadLetterNotReplayable = problem(
    409, "dead_letter_not_replayable", "This dead letter cannot be replayed"
)


class DeadLetterOut(BaseModel):
    id: int
    consumer: str
    topic: str
    event_id: str
    reason: str = Field(description="`bad_data`, `undecodable` or `unexpected`")
    error: str
    at: datetime
    replayed_at: datetime | None
    payload: str = Field(description="The event as received (raw text when undecodable)")


def out(row: DeadLetter) -> DeadLetterOut:
    return DeadLetterOut(
        id=row.id,
        consumer=row.consumer,
        topic=row.topic,
        event_id=row.event_id,
        reason=row.reason,
        error=row.error,
        at=row.at,
        replayed_at=row.replayed_at,
        payload=row.payload,
    )


def listing(
    db: Session,
    *,
    consumer: str | None = None,
    include_replayed: bool = False,
    limit: int = 100,
) -> list[DeadLetter]:
    query = select(DeadLetter).order_by(DeadLetter.id).limit(limit)
    if consumer:
        query = query.where(DeadLetter.consumer == consumer)
    if not include_replayed:
        query = query.where(DeadLetter.replayed_at.is_(None))
    return list(db.scalars(query))


def replay(factory: sessionmaker[Session], bus: EventBus, dead_letter_id: int) -> DeadLetter:
    """Publish the event again and mark the dead letter replayed (published first: a crash in
    between leaves it open, and replaying it again is harmless)."""
    with factory() as db:
        row = db.get(DeadLetter, dead_letter_id)
        if row is None:
            raise DeadLetterUnknown(f"No dead letter {dead_letter_id}")
        if row.replayed_at is not None:
            raise DeadLetterNotReplayable(f"Already replayed at {row.replayed_at.isoformat()}")
        if row.reason == "undecodable":
            raise DeadLetterNotReplayable("The record is not an event; its raw bytes are kept")
        event = CloudEvent.from_json(row.payload)
        topic, key = row.topic, row.key or event.subject or ""
    bus.publish(topic, key, event)
    with factory() as db, db.begin():
        row = db.get(DeadLetter, dead_letter_id)
        if row is None:  # pragma: no cover - dead letters are never deleted
            raise NotFound("The dead letter went away")
        row.replayed_at = utcnow()
    log.info(
        "deadletter.replayed",
        dead_letter_id=dead_letter_id,
        consumer=row.consumer,
        topic=topic,
        event_id=event.id,
    )
    return row


def replay_all(
    factory: sessionmaker[Session], bus: EventBus, *, consumer: str | None = None
) -> tuple[int, int]:
    """Replay every open dead letter that can be; returns (replayed, left as they are)."""
    with factory() as db:
        ids = [
            (r.id, r.reason)
            for r in listing(db, consumer=consumer, include_replayed=False, limit=100_000)
        ]
    replayed = skipped = 0
    for dead_letter_id, reason in ids:
        if reason == "undecodable":
            skipped += 1
            continue
        replay(factory, bus, dead_letter_id)
        replayed += 1
    return replayed, skipped
