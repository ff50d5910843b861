"""The payment sandbox as a deployable part (its own app; mounted at /sandbox/pay when embedded)."""

from __future__ import annotations

import threading
from pathlib import Path

from services.paysandbox import endpoints, notify
from shared.runtime import Migrations, Part, Runtime, Worker


def _workers(rt: Runtime) -> list[Worker]:
    secret = notify.notify_secret(rt.settings)

    def deliver(stop: threading.Event) -> None:
        notify.run_delivery(rt.sessionmaker, secret, stop)

    return [deliver]


part = Part(
    name="paysandbox",
    routers=[endpoints.router],
    workers=_workers,
    migrations=Migrations(Path(__file__).parent / "migrations", "alembic_version_paysandbox"),
)
