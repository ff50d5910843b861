from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from pydantic import ValidationError

from shared.events import CloudEvent

UNDECODABLE = "citypark.undecodable"


@dataclass(frozen=True)
class Message:
    topic: str
    key: str
    event: CloudEvent
    position: str  # partition/offset or log row id, for logs
    # Set when the record is not a CloudEvent at all: `event` is then a placeholder and the
    # consumer dead-letters the raw record, alone, without touching the records around it.
    undecodable: str | None = None
    raw: str | None = None


def decode(topic: str, key: str, raw: bytes | str, position: str) -> Message:
    """A record as a message; never raises, so one bad record cannot take its poll down."""
    try:
        return Message(topic, key, CloudEvent.from_json(raw), position)
    except (ValidationError, ValueError, UnicodeDecodeError) as exc:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        placeholder = CloudEvent(
            id=f"undecodable:{topic}:{position}",
            source="bus",
            type=UNDECODABLE,
            time=datetime.now(UTC),
            data={},
        )
        return Message(topic, key, placeholder, position, undecodable=str(exc)[:500], raw=text)


Handler = Callable[[Message], None]


class EventBus(Protocol):
    def publish(self, topic: str, key: str, event: CloudEvent) -> None:
        """Return only once the event is durable (acks=all, or committed to the log)."""

    def publish_many(self, items: Sequence[tuple[str, str, CloudEvent]]) -> None: ...

    def close(self) -> None: ...


class Subscription(Protocol):
    def poll(self, timeout_s: float) -> list[Message]: ...

    def commit(self, messages: list[Message]) -> None:
        """Mark these (and everything before them) as done for this consumer group."""

    def close(self) -> None: ...
