"""The consumer loop on the embedded log backend: batches, poison isolation, dedupe, offsets."""

from __future__ import annotations

import threading
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.bus.consumer import ConsumerLoop, dead_letter_to_db, idempotent
from shared.bus.log import LogBus, LogSubscription
from shared.bus.migrations_path import BUS_MIGRATIONS
from shared.bus.models import DeadLetter, LogOffset, LogRow
from shared.bus.outbox import enqueue
from shared.bus.port import Message
from shared.db import make_engine, make_sessionmaker
from shared.events import CloudEvent, EventType, new_event
from shared.migrate import upgrade


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
