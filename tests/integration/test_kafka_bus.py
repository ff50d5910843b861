"""The Kafka backend of the bus on a real broker: durable publish, manual commits, redelivery."""

from __future__ import annotations

import threading
import uuid

import pytest
from kafka import KafkaProducer
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.bus.consumer import ConsumerLoop, dead_letter_to_db, idempotent
from shared.bus.kafka import KafkaBus, KafkaSubscription
from shared.bus.models import DeadLetter
from shared.bus.port import Message
from shared.events import CloudEvent, EventType, new_event
from shared.settings import Settings

pytestmark = pytest.mark.integration


class Payload(BaseModel):
    n: int


def event(n: int) -> CloudEvent:
    return new_event(EventType.parking_entry, source="tests", data=Payload(n=n))


def drain(sub: KafkaSubscription, want: int, rounds: int = 40) -> list[Message]:
    got: list[Message] = []
    for _ in range(rounds):
        got += sub.poll(0.5)
        if len(got) >= want:
            break
    return got


def test_published_events_reach_a_consumer_group_in_key_order(
    settings: Settings, topic: str
) -> None:
    bus = KafkaBus(settings.kafka_bootstrap)
    bus.publish_many([(topic, "lot-1", event(i)) for i in range(5)])
    sub = KafkaSubscription(settings.kafka_bootstrap, f"g-{uuid.uuid4().hex[:6]}", [topic])
    got = drain(sub, 5)
    assert [m.event.data["n"] for m in got] == [0, 1, 2, 3, 4]  # one key → one partition
    assert {m.key for m in got} == {"lot-1"}
    sub.commit(got)
    sub.close()
    bus.close()


def test_uncommitted_messages_are_delivered_again(settings: Settings, topic: str) -> None:
    bus = KafkaBus(settings.kafka_bootstrap)
    bus.publish(topic, "k", event(1))
    group = f"g-{uuid.uuid4().hex[:6]}"
    first = KafkaSubscription(settings.kafka_bootstrap, group, [topic])
    assert len(drain(first, 1)) == 1
    first.close()  # crashed before committing
    second = KafkaSubscription(settings.kafka_bootstrap, group, [topic])
    again = drain(second, 1)
    assert [m.event.data["n"] for m in again] == [1]
    second.commit(again)
    second.close()
    third = KafkaSubscription(settings.kafka_bootstrap, group, [topic])
    assert third.poll(2.0) == []
    third.close()
    bus.close()


def test_consumer_loop_retries_in_order_and_dedupes(
    settings: Settings, topic: str, factory: sessionmaker[Session]
) -> None:
    bus = KafkaBus(settings.kafka_bootstrap)
    first, second = event(1), event(2)
    bus.publish_many([(topic, "k", first), (topic, "k", first), (topic, "k", second)])
    seen: list[int] = []
    failures = {"left": 2}

    def handle(_db: Session, message: Message) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("a neighbour is away")
        seen.append(message.event.data["n"])

    group = f"g-{uuid.uuid4().hex[:6]}"
    stop = threading.Event()
    loop = ConsumerLoop(
        group,
        KafkaSubscription(settings.kafka_bootstrap, group, [topic]),
        idempotent(factory, group, handle),
        stop=stop,
    )
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        for _ in range(100):
            if len(seen) >= 2:
                break
            stop.wait(0.2)
    finally:
        stop.set()
        thread.join(timeout=15)
    assert seen == [1, 2]  # the duplicate of 1 was skipped at the door, order kept


def test_a_record_that_does_not_decode_is_set_aside_alone_and_its_fetch_is_kept(
    settings: Settings, topic: str, factory: sessionmaker[Session]
) -> None:
    """A broken record in the middle of a fetch: the records around it, fetched with it, are
    handled; it alone is dead-lettered with its raw bytes; the group commits past all of it."""
    bus = KafkaBus(settings.kafka_bootstrap)
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap.split(","), acks="all")
    bus.publish_many([(topic, "k", event(1)), (topic, "k", event(2))])
    raw.send(topic, key=b"k", value=b"\xff\x00 not an event").get(timeout=15)
    bus.publish_many([(topic, "k", event(3)), (topic, "k", event(4))])
    raw.close()
    seen: list[int] = []
    group = f"g-{uuid.uuid4().hex[:6]}"
    stop = threading.Event()
    loop = ConsumerLoop(
        group,
        KafkaSubscription(settings.kafka_bootstrap, group, [topic]),
        idempotent(factory, group, lambda _db, m: seen.append(m.event.data["n"])),
        stop=stop,
        dead_letter=dead_letter_to_db(factory, group),
    )
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        for _ in range(100):
            if len(seen) >= 4:
                break
            stop.wait(0.2)
    finally:
        stop.set()
        thread.join(timeout=15)
    assert seen == [1, 2, 3, 4]
    with factory() as db:
        dead = db.scalars(select(DeadLetter).where(DeadLetter.consumer == group)).all()
    assert [(d.reason, d.topic) for d in dead] == [("undecodable", topic)]
    assert "not an event" in dead[0].payload
    after = KafkaSubscription(settings.kafka_bootstrap, group, [topic])
    try:
        assert drain(after, 1, rounds=6) == []  # committed past the broken record too
    finally:
        after.close()
