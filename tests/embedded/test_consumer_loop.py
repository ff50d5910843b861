"""The consumer loop on the embedded log backend: batches, poison isolation, dedupe, offsets."""

from __future__ import annotations

import threading
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared import workqueue
from shared.bus.consumer import ConsumerLoop, dead_letter_to_db, idempotent
from shared.bus.log import LogBus, LogSubscription
from shared.bus.migrations_path import BUS_MIGRATIONS
from shared.bus.models import DeadLetter, LogOffset, LogRow
from shared.bus.outbox import enqueue
from shared.bus.port import Message
from shared.db import make_engine, make_sessionmaker
from shared.errors import UpstreamUnavailable
from shared.events import CloudEvent, EventType, new_event
from shared.migrate import upgrade
from shared.timeutil import utcnow


class Item(BaseModel):
    n: int


def test_a_poison_message_in_a_batch_is_isolated_and_the_rest_applied_once(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    upgrade(BUS_MIGRATIONS, url, "alembic_version_bus")
    factory = make_sessionmaker(make_engine(url))
    bus = LogBus(factory, "tests")
    events = [new_event(EventType.parking_entry, source="t", data=Item(n=n)) for n in range(6)]
    bus.publish_many([("t.topic", "k", e) for e in events])
    bus.publish("t.topic", "k", events[2])  # a redelivery

    def handle(db: Session, message: Message) -> None:
        n = message.event.data["n"]
        if n == 3:
            raise ValueError("poison: cannot ever be applied")
        # The effect lives in the database, in the consumer's transaction.
        enqueue(
            db,
            source="handler",
            topic="t.out",
            key="k",
            event=new_event(EventType.parking_exit, source="t", data=Item(n=n)),
        )

    stop = threading.Event()
    sub = LogSubscription(factory, "g", ["t.topic"])
    loop = ConsumerLoop(
        "g",
        sub,
        idempotent(factory, "g", handle, batch=True),
        stop=stop,
        dead_letter=dead_letter_to_db(factory, "g"),
        idle=stop.set,
    )  # stop once the log is drained
    thread = threading.Thread(target=loop.run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()

    # The batch failed on the poison and fell back to one by one: the good ones are applied
    # once (the batch attempt rolled back whole), the redelivery is skipped at the door.
    with factory() as db:
        out = db.scalars(select(LogRow).where(LogRow.topic == "t.out")).all()
        applied = sorted(CloudEvent.from_json(r.payload).data["n"] for r in out)
    assert applied == [0, 1, 2, 4, 5]
    with factory() as db:
        dead = db.scalars(select(DeadLetter)).all()
        offset = db.get(LogOffset, "g")
    assert [d.event_id for d in dead] == [events[3].id]
    assert offset is not None
    assert offset.position == 7


def _city_bus(tmp_path: Path) -> tuple[sessionmaker[Session], LogBus]:
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    upgrade(BUS_MIGRATIONS, url, "alembic_version_bus")
    factory = make_sessionmaker(make_engine(url))
    return factory, LogBus(factory, "tests")


def _drain(loop: ConsumerLoop) -> None:
    thread = threading.Thread(target=loop.run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()


def test_a_bug_is_retried_a_few_times_then_parked_and_the_partition_moves_on(
    tmp_path: Path,
) -> None:
    factory, bus = _city_bus(tmp_path)
    events = [new_event(EventType.parking_entry, source="t", data=Item(n=n)) for n in range(4)]
    bus.publish_many([("t.topic", "k", e) for e in events])
    tries: dict[int, int] = {}
    applied: list[int] = []

    def handle(_db: Session, message: Message) -> None:
        n = message.event.data["n"]
        tries[n] = tries.get(n, 0) + 1
        if n == 1:
            raise KeyError("lot_code")  # a bug, not bad data: it may be a race, so retried
        applied.append(n)

    stop = threading.Event()
    loop = ConsumerLoop(
        "g",
        LogSubscription(factory, "g", ["t.topic"]),
        idempotent(factory, "g", handle),
        stop=stop,
        dead_letter=dead_letter_to_db(factory, "g"),
        max_backoff_s=0.05,
        idle=stop.set,
    )
    _drain(loop)
    assert tries[1] == workqueue.PARK_AFTER  # not once (poison), not forever (stalled)
    assert applied == [0, 2, 3]
    with factory() as db:
        dead = db.scalars(select(DeadLetter)).all()
    assert [(d.event_id, d.reason) for d in dead] == [(events[1].id, "unexpected")]
    assert "KeyError" in dead[0].error


def test_an_outage_of_a_neighbour_is_waited_out_never_dead_lettered(tmp_path: Path) -> None:
    factory, bus = _city_bus(tmp_path)
    events = [new_event(EventType.parking_entry, source="t", data=Item(n=n)) for n in range(3)]
    bus.publish_many([("t.topic", "k", e) for e in events])
    outage = {"left": workqueue.PARK_AFTER * 2}  # longer than a bug would be tolerated
    applied: list[int] = []

    def handle(_db: Session, message: Message) -> None:
        if message.event.data["n"] == 1 and outage["left"]:
            outage["left"] -= 1
            raise UpstreamUnavailable("lots unreachable: ReadTimeout")
        applied.append(message.event.data["n"])

    stop = threading.Event()
    loop = ConsumerLoop(
        "g",
        LogSubscription(factory, "g", ["t.topic"]),
        idempotent(factory, "g", handle),
        stop=stop,
        dead_letter=dead_letter_to_db(factory, "g"),
        max_backoff_s=0.05,
        idle=stop.set,
    )
    _drain(loop)
    assert applied == [0, 1, 2]  # in order, the outage waited out
    with factory() as db:
        assert db.scalars(select(DeadLetter)).all() == []


def test_a_record_that_is_not_an_event_is_dead_lettered_alone(tmp_path: Path) -> None:
    factory, bus = _city_bus(tmp_path)
    good = [new_event(EventType.parking_entry, source="t", data=Item(n=n)) for n in range(3)]
    bus.publish("t.topic", "k", good[0])
    with factory() as db, db.begin():
        db.add(LogRow(source="x", topic="t.topic", key="k", event_id="?", payload="{not json"))
    bus.publish_many([("t.topic", "k", e) for e in good[1:]])
    applied: list[int] = []
    stop = threading.Event()
    loop = ConsumerLoop(
        "g",
        LogSubscription(factory, "g", ["t.topic"]),
        idempotent(factory, "g", lambda _db, m: applied.append(m.event.data["n"]), batch=True),
        stop=stop,
        dead_letter=dead_letter_to_db(factory, "g"),
        idle=stop.set,
    )
    _drain(loop)
    assert applied == [0, 1, 2]
    with factory() as db:
        dead = db.scalars(select(DeadLetter)).all()
    assert [(d.reason, d.payload) for d in dead] == [("undecodable", "{not json")]


def test_a_message_set_aside_twice_is_one_dead_letter_until_replayed(tmp_path: Path) -> None:
    """A redelivery (a rebalance, a restart) of a message already set aside adds nothing; once
    ops replayed it, failing again is a new dead letter."""
    factory, _ = _city_bus(tmp_path)
    sink = dead_letter_to_db(factory, "g")
    message = Message(
        "t.topic", "k", new_event(EventType.parking_entry, source="t", data=Item(n=1)), "1"
    )
    sink(message, ValueError("bad"), "bad_data")
    sink(message, ValueError("bad"), "bad_data")
    with factory() as db:
        assert len(db.scalars(select(DeadLetter)).all()) == 1
    with factory() as db, db.begin():
        db.scalars(select(DeadLetter)).one().replayed_at = utcnow()
    sink(message, ValueError("bad"), "bad_data")
    with factory() as db:
        assert len(db.scalars(select(DeadLetter)).all()) == 2
