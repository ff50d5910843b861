"""The Kafka backend of the bus on a real broker: durable publish, manual commits, redelivery."""

from __future__ import annotations

import threading
import uuid

import pytest
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from shared.bus.consumer import ConsumerLoop, idempotent
from shared.bus.kafka import KafkaBus, KafkaSubscription
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
