"""The whole city on the embedded default, in-process, for tests that drive it over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient
from pydantic import SecretStr

from services import city
from services.billing.provider.sandbox import SandboxProvider
from shared.internal import InternalClient
from shared.settings import BusKind, CacheKind, Settings


@contextmanager
def embedded_city(db_file: Path, *, raise_server_exceptions: bool = True) -> Iterator[TestClient]:
    # Explicit backends: `make test` exports the real ones for the other suites.
    settings = Settings(
        bus=BusKind.log,
        cache=CacheKind.memory,
        database_url=f"sqlite:///{db_file}",
        jwt_secret=SecretStr("embedded-test-secret-of-32-bytes!"),
        paysandbox_url="http://testserver/sandbox/pay",
    )
    app, rt = city.embedded(settings)
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as tc:
        # Internal calls of the one app go through the test transport, not a socket.
        for service in ("lots", "sessions", "billing"):
            rt.internal_clients[service] = InternalClient(
                "http://testserver", rt.secret, transport=tc._transport
            )
        rt.providers["sandbox"] = SandboxProvider(
            "http://testserver/sandbox/pay", transport=tc._transport
        )
        yield tc
