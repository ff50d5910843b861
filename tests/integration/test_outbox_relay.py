"""Outbox → Kafka: only committed events leave, each once."""

from __future__ import annotations

import uuid

import pytest
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.bus.kafka import KafkaBus, KafkaSubscription
from shared.bus.models import LogRow
from shared.bus.outbox import enqueue, relay_once
from shared.events import EventType, new_event
from shared.settings import Settings

pytestmark = pytest.mark.integration


class Payload(BaseModel):
    tag: str


def test_rolled_back_events_never_leave_and_committed_ones_leave_once(
    settings: Settings, topic: str, factory: sessionmaker[Session]
) -> None:
    source = f"svc-{uuid.uuid4().hex[:6]}"
    with factory() as db, db.begin():
        enqueue(
            db,
            source=source,
            topic=topic,
            key="k",
            event=new_event(EventType.session_closed, source=source, data=Payload(tag="kept")),
        )

    def failing_transaction() -> None:
        with factory() as db, db.begin():
            enqueue(
                db,
                source=source,
                topic=topic,
                key="k",
                event=new_event(EventType.session_closed, source=source, data=Payload(tag="lost")),
            )
            raise RuntimeError("the business transaction failed")

    with pytest.raises(RuntimeError):
        failing_transaction()

    bus = KafkaBus(settings.kafka_bootstrap)
    assert relay_once(factory, bus, source) == 1
    assert relay_once(factory, bus, source) == 0
    with factory() as db:
        rows = db.scalars(select(LogRow).where(LogRow.source == source)).all()
    assert [r.relayed_at is not None for r in rows] == [True]

    sub = KafkaSubscription(settings.kafka_bootstrap, f"g-{uuid.uuid4().hex[:6]}", [topic])
    got = []
    for _ in range(20):
        got += sub.poll(0.5)
        if got:
            break
    assert [m.event.data["tag"] for m in got] == ["kept"]
    sub.close()
    bus.close()
