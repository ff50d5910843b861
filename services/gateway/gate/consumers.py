"""Keeps the gate's Redis state current from account events (idempotent by version), and
rebuilds it from the services' records whenever Redis turns out to have lost it."""

from __future__ import annotations

import threading

from services.gateway.gate.rebuild import keeper
from services.gateway.gate.state import apply_account
from shared.bus.consumer import ConsumerLoop, dead_letter_to_db
from shared.bus.factory import make_subscription
from shared.bus.port import Message
from shared.events import AccountUpdated
from shared.runtime import Runtime, Worker
from shared.topics import ACCOUNT_EVENTS

GROUP = "citypark-gateway-state"


def workers(rt: Runtime) -> list[Worker]:
    def handle(message: Message) -> None:
        apply_account(rt.redis, rt.settings, AccountUpdated.opened(rt.settings, message.event.data))

    def consume(stop: threading.Event) -> None:
        sub = make_subscription(rt.settings, rt.sessionmaker, GROUP, [ACCOUNT_EVENTS])
        # An event that can never apply is kept for ops in the gateway's database rather
        # than only logged: the driver's next change (or a rebuild) puts the state right.
        sink = dead_letter_to_db(rt.sessionmaker, GROUP)
        ConsumerLoop(GROUP, sub, handle, stop=stop, dead_letter=sink).run()

    return [consume, keeper(rt)]
