"""A district's Kafka topic, created when ops add the district (no restart of anything).

The gateway and the adapter also ensure it before their first use, so a failure here (the
broker briefly away) delays nothing for good; it is logged and the district still exists."""

from __future__ import annotations

import structlog
from sqlalchemy import event
from sqlalchemy.orm import Session

from shared.settings import BusKind, Settings
from shared.topics import ensure_topics, lot_events

log = structlog.get_logger(__name__)

# Set by the composition root for the processes that serve the admin API.
_settings: Settings | None = None


def configure(settings: Settings) -> None:
    global _settings
    _settings = settings


def ensure_topic(settings: Settings, district: str) -> None:
    if settings.bus is BusKind.kafka:
        created = ensure_topics(settings.kafka_bootstrap, [lot_events(district)], auth=settings)
        if created:
            log.info("district.topic_created", district=district, topic=created[0])


def on_district_created(db: Session, code: str) -> None:
    """Create the topic once the district is committed (a rolled-back one gets none)."""
    settings = _settings
    if settings is None or settings.bus is not BusKind.kafka:
        return

    @event.listens_for(db, "after_commit", once=True)
    def _create(_: Session) -> None:
        try:
            ensure_topic(settings, code)
        except Exception as exc:  # the district stays; its first user creates the topic
            log.warning("district.topic_failed", district=code, error=repr(exc))
