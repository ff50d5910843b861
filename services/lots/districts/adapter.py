"""A district adapter: one consumer per district turning what the gateway took from the
district (its lots' connector events, or its platform's records in its dialect) into canonical
parking events for the whole city.

At-least-once in, exactly-once in effect: the inbox dedupes on the event id in the same
transaction that writes the canonical event to the outbox, and the event keeps its id on
`citypark.parking-events`, so the one window left (published, not yet marked relayed) only
repeats an id that sessions dedupe. The district checks live here: a record whose car park is
unknown or belongs to another district is refused and counted, never published.
"""

from __future__ import annotations

import threading
import time
from typing import Final

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.lots.districts import figures, provision
from services.lots.models import District, Lot
from shared.bus.consumer import (
    BatchHandler,
    ConsumerLoop,
    Subscription,
    dead_letter_to_db,
    first_time,
    first_times,
)
from shared.bus.factory import make_subscription
from shared.bus.models import LogOffset, LogRow
from shared.bus.outbox import enqueue, run_relay
from shared.bus.port import Handler, Message
from shared.events import EventType, LotEvent, ParkingEvent, new_event
from shared.runtime import Runtime, Worker
from shared.settings import BusKind, Settings
from shared.topics import PARKING_EVENTS, lot_events

log = structlog.get_logger(__name__)

CANONICAL: Final = {
    EventType.connector_entry: EventType.parking_entry,
    EventType.connector_exit: EventType.parking_exit,
}
LOT_CACHE_S = 10.0  # a car park moved to another district is seen within this long
LAG_EVERY_S = 2.0


def group_of(district: str) -> str:
    return f"citypark-district-{district}"


def source_of(district: str) -> str:
    """Each adapter relays only its own outbox rows."""
    return f"district-{district}"


def to_parking_event(settings: Settings, message: Message) -> tuple[EventType, ParkingEvent]:
    target = CANONICAL.get(EventType(message.event.type))
    if target is None:
        raise ValueError(f"no canonical form for {message.event.type}")
    # Sealed as it came; an event from before plates were sealed is sealed here, so the
    # canonical topic never carries a plate in clear.
    lot_event = LotEvent.opened(settings, message.event.data)
    # District platforms' records say which dialect they came in; connectors speak canonical.
    dialect = str(message.event.data.get("dialect") or "canonical")
    return target, ParkingEvent(
        **lot_event.model_dump(), plate=lot_event.plate, dialect=dialect
    ).sealed(settings)


class LotDirectory:
    """Which district a car park belongs to, cached briefly: one query per lot, not per event."""

    def __init__(self, ttl_s: float = LOT_CACHE_S) -> None:
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, str | None]] = {}

    def district_of(self, db: Session, lot_id: str) -> str | None:
        now = time.monotonic()
        hit = self._cache.get(lot_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        district = db.scalar(select(Lot.district).where(Lot.id == lot_id))
        self._cache[lot_id] = (now + self.ttl_s, district)
        return district


def make_handler(rt: Runtime, district: str) -> Handler:
    """The handler of one district's topic, idempotent on the event id; a whole poll is taken
    in one transaction (one inbox statement, one outbox insert, one Redis round trip for the
    figures), and one message at a time when the poll holds a poison one."""
    counts = figures.AdapterFigures(rt.redis, district)
    lots = LotDirectory()
    source = source_of(district)
    group = group_of(district)

    def apply(db: Session, message: Message, published: list[tuple[str, str]]) -> None:
        target, parking = to_parking_event(rt.settings, message)
        owner = lots.district_of(db, parking.lot_id)
        reason = None
        if owner is None:
            reason = "lot_unknown"
        elif owner != district or parking.district != district:
            reason = "lot_other_district"
        if reason is not None:
            log.warning(
                "district.rejected", district=district, event_id=message.event.id, reason=reason
            )
            counts.rejected(message.event.id, reason)
            return
        # The same event id downstream: a redelivery here is deduplicated by sessions.
        enqueue(
            db,
            source=source,
            topic=PARKING_EVENTS,
            key=parking.lot_id,
            event=new_event(
                target,
                source=f"district/{district}",
                data=parking,
                subject=parking.lot_id,
                id_=message.event.id,
            ),
        )
        published.append((message.event.id, parking.kind.value))

    # The figures are counted just before commit, not after: they dedupe on the event id, so
    # a crash before the commit only recounts nothing on redelivery, while a crash after it
    # would leave published events uncounted for good (the inbox then skips them).
    def one(message: Message) -> None:
        published: list[tuple[str, str]] = []
        with rt.sessionmaker() as db, db.begin():
            if first_time(db, group, message.event.id):
                apply(db, message, published)
            counts.published(published)

    def many(messages: list[Message]) -> None:
        published: list[tuple[str, str]] = []
        with rt.sessionmaker() as db, db.begin():
            fresh = first_times(db, group, [m.event.id for m in messages])
            for message in messages:
                if message.event.id in fresh:
                    fresh.discard(message.event.id)  # a repeat inside the poll counts once
                    apply(db, message, published)
            counts.published(published)

    return BatchHandler(one, many)


class MeasuredSubscription:
    """A subscription that reports how far behind its topic the consumer is."""

    def __init__(self, rt: Runtime, district: str, inner: Subscription) -> None:
        self.rt = rt
        self.district = district
        self.inner = inner
        self.counts = figures.AdapterFigures(rt.redis, district)
        self._measured = 0.0

    def poll(self, timeout_s: float) -> list[Message]:
        messages = self.inner.poll(timeout_s)
        if not messages:
            self.measure()
        return messages

    def commit(self, messages: list[Message]) -> None:
        self.inner.commit(messages)
        self.measure()

    def rewind(self) -> None:
        self.inner.rewind()

    def close(self) -> None:
        self.inner.close()

    def measure(self, force: bool = False) -> int | None:
        now = time.monotonic()
        if not force and now - self._measured < LAG_EVERY_S:
            return None
        self._measured = now
        try:
            lag = self._lag()
        except Exception as exc:  # a figure, not a reason to stop consuming
            log.debug("district.lag_unknown", district=self.district, error=repr(exc))
            return None
        self.counts.lag(lag)
        return lag

    def _lag(self) -> int:
        consumer = getattr(self.inner, "consumer", None)
        if consumer is not None:  # Kafka: end offsets minus our positions
            assigned = list(consumer.assignment())
            if not assigned:
                return 0
            ends = consumer.end_offsets(assigned)
            return sum(max(0, ends[tp] - consumer.position(tp)) for tp in assigned)
        with self.rt.sessionmaker() as db:  # the embedded log: rows after our committed one
            offset = db.get(LogOffset, group_of(self.district))
            position = offset.position if offset else 0
            return int(
                db.scalar(
                    select(func.count())
                    .select_from(LogRow)
                    .where(LogRow.topic == lot_events(self.district), LogRow.id > position)
                )
                or 0
            )


def workers(rt: Runtime, district: str) -> list[Worker]:
    group = group_of(district)

    def consume(stop: threading.Event) -> None:
        provision.ensure_topic(rt.settings, district)
        sub = make_subscription(rt.settings, rt.sessionmaker, group, [lot_events(district)])
        ConsumerLoop(
            group,
            MeasuredSubscription(rt, district, sub),
            make_handler(rt, district),
            stop=stop,
            dead_letter=dead_letter_to_db(rt.sessionmaker, group),
        ).run()

    out: list[Worker] = [consume]
    if rt.settings.bus is BusKind.kafka:
        out.append(lambda stop: run_relay(rt.sessionmaker, rt.bus, source_of(district), stop))
    return out


def every_district(rt: Runtime, poll_s: float = 2.0) -> Worker:
    """For the one-process city: an adapter for each district, including those ops add later."""

    def supervise(stop: threading.Event) -> None:
        running: dict[str, list[threading.Thread]] = {}
        while True:
            try:
                with rt.sessionmaker() as db:
                    codes = list(db.scalars(select(District.code)))
            except Exception as exc:
                log.warning("district.supervisor_failed", error=repr(exc))
                codes = []
            for code in codes:
                if code in running:
                    continue
                threads = [
                    threading.Thread(target=w, args=(stop,), daemon=True, name=f"district-{code}")
                    for w in workers(rt, code)
                ]
                for t in threads:
                    t.start()
                running[code] = threads
                log.info("district.adapter_started", district=code)
            if stop.wait(poll_s):
                break
        for threads in running.values():
            for t in threads:
                t.join(timeout=5)

    return supervise
