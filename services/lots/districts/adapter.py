"""A district adapter: one consumer per district turning what its lots sent (in the district's
dialect) into canonical parking events for the whole city."""

from __future__ import annotations

import threading

import structlog

from shared.bus.consumer import ConsumerLoop
from shared.bus.factory import make_subscription
from shared.bus.port import Handler, Message
from shared.events import EventType, LotEvent, ParkingEvent, new_event
from shared.runtime import Runtime, Worker
from shared.topics import PARKING_EVENTS, lot_events

log = structlog.get_logger(__name__)
STATS_TTL_S = 8 * 24 * 3600

CANONICAL = {
    EventType.connector_entry: EventType.parking_entry,
    EventType.connector_exit: EventType.parking_exit,
}


def to_parking_event(
    message: Message, dialect: str = "canonical"
) -> tuple[EventType, ParkingEvent]:
    target = CANONICAL.get(EventType(message.event.type))
    if target is None:
        raise ValueError(f"no canonical form for {message.event.type}")
    lot_event = LotEvent.model_validate(message.event.data)
    return target, ParkingEvent(**lot_event.model_dump(), dialect=dialect)


def make_handler(rt: Runtime, district: str) -> Handler:
    stats = f"citypark:district:{district}:stats"

    def handle(message: Message) -> None:
        target, parking = to_parking_event(message)
        if parking.district != district:
            raise ValueError(f"event of {parking.district} on the topic of {district}")
        # The same event id downstream: a redelivery here is deduplicated by sessions.
        rt.bus.publish(
            PARKING_EVENTS,
            parking.lot_id,
            new_event(
                target,
                source=f"district/{district}",
                data=parking,
                subject=parking.lot_id,
                id_=message.event.id,
            ),
        )
        # Count each event once, however often it is delivered.
        if rt.redis.set(f"{stats}:seen:{message.event.id}", 1, nx=True, ex=STATS_TTL_S):
            rt.redis.hincrby(stats, parking.kind.value, 1)

    return handle


def workers(rt: Runtime, district: str) -> list[Worker]:
    group = f"citypark-district-{district}"

    def consume(stop: threading.Event) -> None:
        sub = make_subscription(rt.settings, rt.sessionmaker, group, [lot_events(district)])
        ConsumerLoop(group, sub, make_handler(rt, district), stop=stop).run()

    return [consume]
