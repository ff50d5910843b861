"""The consumer loop: dedupe at the door, handle in one transaction, commit offsets last.

Failure policy (shared/workqueue.py, the same for every queue): a transient error (the
database or a neighbour away, a timeout) is retried with capped backoff, in order, for as long
as it takes, without committing past it; a message that can never succeed (it does not
decode or validate, or a service refused it as a client error) is dead-lettered at once with
its reason; an unexpected error (a bug) is retried a few times and then that one message is
dead-lettered as `unexpected`, so the partition moves on. Dead letters are replayed by ops
(`citypark deadletters replay`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import structlog
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from shared import workqueue
from shared.bus.models import DeadLetter, InboxRow
from shared.bus.port import Handler, Message

log = structlog.get_logger(__name__)


class Subscription(Protocol):
    def poll(self, timeout_s: float) -> list[Message]: ...
    def commit(self, messages: list[Message]) -> None: ...
    def rewind(self) -> None: ...
    def close(self) -> None: ...


def first_time(db: Session, consumer: str, event_id: str) -> bool:
    """Record that `consumer` saw `event_id`; False when it had already (a redelivery)."""
    values = {"consumer": consumer, "event_id": event_id}
    dialect = db.get_bind().dialect.name
    if dialect not in ("postgresql", "sqlite"):
        raise NotImplementedError(f"inbox on {dialect}")
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # RETURNING tells reliably whether the row went in (rowcount does not, on every driver).
    stmt = insert(InboxRow).values(values).on_conflict_do_nothing().returning(InboxRow.event_id)
    return db.execute(stmt).scalar() is not None


def first_times(db: Session, consumer: str, event_ids: list[str]) -> set[str]:
    """The inbox for a whole poll in one statement: the ids `consumer` had not seen before."""
    if not event_ids:
        return set()
    dialect = db.get_bind().dialect.name
    if dialect not in ("postgresql", "sqlite"):
        raise NotImplementedError(f"inbox on {dialect}")
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(InboxRow)
        .values([{"consumer": consumer, "event_id": e} for e in dict.fromkeys(event_ids)])
        .on_conflict_do_nothing()
        .returning(InboxRow.event_id)
    )
    return set(db.scalars(stmt))


class BatchHandler:
    """A handler that can also take a whole poll at once (`batch`), for throughput."""

    def __init__(self, one: Handler, batch: Callable[[list[Message]], None]) -> None:
        self.one = one
        self.batch = batch

    def __call__(self, message: Message) -> None:
        self.one(message)


def idempotent(
    factory: sessionmaker[Session],
    consumer: str,
    handle: Callable[[Session, Message], None],
    *,
    batch: bool = False,
) -> Handler:
    """Wrap a handler so each event id is applied once, in the same transaction as its effects.

    With `batch=True` a poll's messages are applied in one transaction (one commit per batch,
    not per event); if any of them fails, the loop falls back to one transaction per message,
    so a poison message is isolated and the good ones around it still go through. Only for
    handlers whose every effect is in the database (a retried batch repeats other effects).
    """

    def apply(db: Session, message: Message) -> None:
        if not first_time(db, consumer, message.event.id):
            log.debug("consumer.duplicate", consumer=consumer, event_id=message.event.id)
            return
        handle(db, message)

    def one(message: Message) -> None:
        with factory() as db, db.begin():
            apply(db, message)

    def many(messages: list[Message]) -> None:
        with factory() as db, db.begin():
            fresh = first_times(db, consumer, [m.event.id for m in messages])  # one statement
            for message in messages:
                if message.event.id not in fresh:
                    log.debug("consumer.duplicate", consumer=consumer, event_id=message.event.id)
                    continue
                fresh.discard(message.event.id)  # a repeat inside the poll counts once
                handle(db, message)

    return BatchHandler(one, many) if batch else one


def _storable(text: str) -> str:
    """Text any database stores: PostgreSQL refuses NUL in a text column, and a dead letter
    that cannot be stored would stall its partition behind it."""
    return text.replace("\x00", "\\x00")


def dead_letter_to_db(factory: sessionmaker[Session], consumer: str) -> DeadLetterSink:
    def sink(message: Message, error: BaseException, reason: str) -> None:
        with factory() as db, db.begin():
            already = db.scalar(
                select(DeadLetter.id).where(
                    DeadLetter.consumer == consumer,
                    DeadLetter.event_id == message.event.id,
                    DeadLetter.replayed_at.is_(None),
                )
            )
            if already is not None:  # a redelivery (a rebalance, a restart) of one set aside
                return
            payload = message.raw if message.undecodable is not None else None
            db.add(
                DeadLetter(
                    consumer=consumer,
                    topic=message.topic,
                    key=_storable(message.key),
                    event_id=message.event.id,
                    payload=_storable(payload or message.event.model_dump_json()),
                    error=_storable(repr(error)[:2000]),
                    reason=reason,
                )
            )

    return sink


DeadLetterSink = Callable[[Message, BaseException, str], None]


class Undecodable(ValueError):
    """The record is not an event."""


class ConsumerLoop:
    def __init__(
        self,
        name: str,
        subscription: Subscription,
        handler: Handler,
        *,
        stop: threading.Event,
        dead_letter: DeadLetterSink | None = None,
        max_backoff_s: float = 10.0,
        idle: Callable[[], None] | None = None,
        park_after: int = workqueue.PARK_AFTER,
    ) -> None:
        self.name = name
        self.subscription = subscription
        self.handler = handler
        self.stop = stop
        self.dead_letter = dead_letter
        self.max_backoff_s = max_backoff_s
        self.idle = idle
        self.park_after = park_after
        self.handled = 0

    def _dead_letter(self, message: Message, exc: BaseException, reason: str) -> bool:
        """Set the message aside; False when it could not be (the sink's database is away):
        then the message is retried like any transient failure, never skipped."""
        log.error(
            "consumer.dead_letter",
            consumer=self.name,
            topic=message.topic,
            event_id=message.event.id,
            reason=reason,
            error=str(exc)[:300],
        )
        if self.dead_letter is not None:
            try:
                self.dead_letter(message, exc, reason)
            except Exception as sink_error:
                log.warning(
                    "consumer.dead_letter_failed", consumer=self.name, error=repr(sink_error)
                )
                return False
        workqueue.DEAD_LETTERS.labels(self.name, reason).inc()
        return True

    def _handle(self, message: Message) -> bool:
        """True when the message is done (handled or dead-lettered); False when stopping."""
        attempt = 0
        strikes = 0
        while True:
            try:
                if message.undecodable is not None:
                    raise Undecodable(message.undecodable)
                self.handler(message)
                self.handled += 1
                return True
            except Exception as exc:
                kind = workqueue.classify(exc)
                reason: str | None = None
                if isinstance(exc, Undecodable):
                    reason = "undecodable"
                elif kind is workqueue.Failure.bad_data:
                    reason = "bad_data"
                elif kind is workqueue.Failure.unexpected:
                    strikes += 1
                    if strikes >= self.park_after:
                        reason = "unexpected"
                if reason is not None and self._dead_letter(message, exc, reason):
                    return True
                workqueue.RETRIES.labels(self.name).inc()
                delay = workqueue.backoff_s(attempt, cap=self.max_backoff_s)
                attempt += 1
                log.warning(
                    "consumer.retry",
                    consumer=self.name,
                    event_id=message.event.id,
                    kind=kind,
                    error=repr(exc)[:300],
                    retry_in_s=delay,
                )
                if self.stop.wait(delay):
                    return False

    def _rewind(self) -> None:
        try:
            self.subscription.rewind()
        except Exception as exc:  # the group is rebalancing; the next poll settles it
            log.warning("consumer.rewind_failed", consumer=self.name, error=repr(exc))

    def _handle_all(self, messages: list[Message]) -> list[Message]:
        """Handle a poll; returns the messages done (a prefix, shorter only when stopping)."""
        batch = getattr(self.handler, "batch", None)
        decodable = all(m.undecodable is None for m in messages)
        if batch is not None and len(messages) > 1 and decodable:
            try:
                batch(messages)
                self.handled += len(messages)
                return messages
            except Exception as exc:
                log.info("consumer.batch_fallback", consumer=self.name, error=repr(exc))
        done: list[Message] = []
        for message in messages:
            if not self._handle(message):
                break
            done.append(message)
        return done

    def run(self) -> None:
        log.info("consumer.started", consumer=self.name)
        try:
            while not self.stop.is_set():
                try:
                    messages = self.subscription.poll(0.5)
                except Exception as exc:
                    log.warning("consumer.poll_failed", consumer=self.name, error=repr(exc))
                    self.stop.wait(1.0)
                    continue
                if not messages:
                    if self.idle is not None:
                        self.idle()
                    continue
                done = self._handle_all(messages)
                try:
                    self.subscription.commit(done)
                except Exception as exc:
                    # A rebalance took the partitions away (e.g. the process was paused past
                    # its session timeout): whoever owns them now gets these messages again,
                    # and the inbox makes the redelivery harmless.
                    log.warning("consumer.commit_failed", consumer=self.name, error=repr(exc))
                    self._rewind()
                    continue
                if len(done) < len(messages):
                    self._rewind()
        finally:
            self.subscription.close()
            log.info("consumer.stopped", consumer=self.name, handled=self.handled)
