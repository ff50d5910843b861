"""The embedded durable log: the outbox table read directly, one position per consumer group."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared import wakeups
from shared.bus.models import LogOffset, LogRow
from shared.bus.outbox import LOG_APPENDED, enqueue
from shared.bus.port import Message, decode
from shared.db import READ_ONLY
from shared.events import CloudEvent


class LogBus:
    def __init__(self, factory: sessionmaker[Session], source: str) -> None:
        self.factory = factory
        self.source = source

    def publish(self, topic: str, key: str, event: CloudEvent) -> None:
        self.publish_many([(topic, key, event)])

    def publish_many(self, items: Sequence[tuple[str, str, CloudEvent]]) -> None:
        with self.factory() as db, db.begin():
            for topic, key, event in items:
                enqueue(db, source=self.source, topic=topic, key=key, event=event)

    def close(self) -> None:
        return None


# A consumer applies a poll in one transaction, holding the database's one write lock: small
# polls keep every other writer's wait short (a poll of 100 held it for seconds under load).
POLL_BATCH = 25


class LogSubscription:
    def __init__(
        self,
        factory: sessionmaker[Session],
        group: str,
        topics: Sequence[str],
        batch: int = POLL_BATCH,
    ) -> None:
        self.factory = factory
        self.group = group
        self.topics = list(topics)
        self.batch = batch
        self._position: int | None = None

    def _load_position(self, db: Session) -> int:
        row = db.get(LogOffset, self.group)
        return row.position if row else 0

    def poll(self, timeout_s: float) -> list[Message]:
        """The next rows after this group's position; with none, waits up to `timeout_s` for
        a commit to the log in this process (rows from another process are seen at the next
        poll), so an idle consumer costs nothing instead of querying in a tight loop."""
        seen = wakeups.generation(LOG_APPENDED)
        messages = self._read()
        if not messages:
            wakeups.wait_past(LOG_APPENDED, seen, timeout_s)
        return messages

    def _read(self) -> list[Message]:
        with self.factory() as db:
            db.connection(execution_options={READ_ONLY: True})  # never waits for the writers
            if self._position is None:
                self._position = self._load_position(db)
            rows = db.scalars(
                select(LogRow)
                .where(LogRow.id > self._position, LogRow.topic.in_(self.topics))
                .order_by(LogRow.id)
                .limit(self.batch)
            ).all()
        messages = [decode(r.topic, r.key, r.payload, str(r.id)) for r in rows]
        if messages:
            self._position = int(messages[-1].position)
        return messages

    def commit(self, messages: list[Message]) -> None:
        if not messages:
            return
        last = max(int(m.position) for m in messages)
        with self.factory() as db, db.begin():
            row = db.get(LogOffset, self.group)
            if row is None:
                db.add(LogOffset(group=self.group, position=last))
            elif last > row.position:
                row.position = last

    def rewind(self) -> None:
        """Forget the in-memory position: the next poll starts after the last commit."""
        self._position = None

    def close(self) -> None:
        return None
