from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.events import CloudEvent


@dataclass(frozen=True)
class Message:
    topic: str
    key: str
    event: CloudEvent
    position: str  # partition/offset or log row id, for logs


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
