"""Keeps the gate's Redis state current from account events (idempotent by version)."""

from __future__ import annotations

import threading

from services.gateway.gate.state import apply_account
from shared.bus.consumer import ConsumerLoop
from shared.bus.factory import make_subscription
from shared.bus.port import Message
from shared.events import AccountUpdated
from shared.runtime import Runtime, Worker
from shared.topics import ACCOUNT_EVENTS

GROUP = "citypark-gateway-state"


def workers(rt: Runtime) -> list[Worker]:
    def handle(message: Message) -> None:
        apply_account(rt.redis, AccountUpdated.model_validate(message.event.data))

    def consume(stop: threading.Event) -> None:
        sub = make_subscription(rt.settings, rt.sessionmaker, GROUP, [ACCOUNT_EVENTS])
        ConsumerLoop(GROUP, sub, handle, stop=stop).run()

    return [consume]
