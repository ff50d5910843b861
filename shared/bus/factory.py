from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session, sessionmaker

from shared.bus.consumer import Subscription
from shared.bus.port import EventBus
from shared.settings import BusKind, Settings


def make_bus(settings: Settings, factory: sessionmaker[Session], source: str) -> EventBus:
    if settings.bus is BusKind.kafka:
        from shared.bus.kafka import KafkaBus, client_config

        return KafkaBus(
            settings.kafka_bootstrap, client_id=f"citypark-{source}", config=client_config(settings)
        )
    from shared.bus.log import LogBus

    return LogBus(factory, source)


def make_subscription(
    settings: Settings, factory: sessionmaker[Session], group: str, topics: Sequence[str]
) -> Subscription:
    if settings.bus is BusKind.kafka:
        from shared.bus.kafka import KafkaSubscription, client_config

        return KafkaSubscription(
            settings.kafka_bootstrap, group, topics, config=client_config(settings)
        )
    from shared.bus.log import LogSubscription

    return LogSubscription(factory, group, topics)
