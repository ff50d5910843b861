"""The whole city on the embedded default, in-process, for tests that drive it over HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from citypark_connector import generate_keypair
from fastapi.testclient import TestClient
from pydantic import SecretStr

from services import city
from services.billing.provider.sandbox import SandboxProvider
from services.billing.vehicle.registry import HttpVehicleRegistry
from shared.doors import DOOR_HEADER
from shared.internal import InternalClient
from shared.settings import BusKind, CacheKind, Settings

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout_s: float = 30) -> T:
    """The first truthy answer of `check`, polled while the city's workers catch up."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError("condition not reached")


@contextmanager
def embedded_city(
    db_file: Path, *, raise_server_exceptions: bool = True, **overrides: Any
) -> Iterator[TestClient]:
    # Explicit backends: `make test` exports the real ones for the other suites. Drivers read
    # their codes from the sandbox SMS outbox; every request comes from the test client's one
    # address, and the in-process cache outlives a city, so sign-in limits are out of the way
    # unless a test sets them (`overrides`).
    fields: dict[str, Any] = {
        "bus": BusKind.log,
        "cache": CacheKind.memory,
        "database_url": f"sqlite:///{db_file}",
        "jwt_secret": SecretStr("embedded-test-secret-of-32-bytes!"),
        "paysandbox_url": "http://testserver/sandbox/pay",
        "sandbox_mode": True,
        "signin_ip_limit": 1_000_000,
        "signin_global_limit": 1_000_000,
    }
    settings = Settings(**{**fields, **overrides})
    app, rt = city.embedded(settings)
    tc = TestClient(app, raise_server_exceptions=raise_server_exceptions)
    # Internal calls of the one app go through the test transport, not a socket. Wired before
    # the app starts: its workers ask for these clients as soon as they run.
    for service in ("lots", "sessions", "billing"):
        rt.internal_clients[service] = client = InternalClient(
            "http://testserver", rt.secret, transport=tc._transport
        )
        client.http.headers[DOOR_HEADER] = app.state.door_token
    rt.providers["sandbox"] = SandboxProvider(
        "http://testserver/sandbox/pay", transport=tc._transport
    )
    rt.vehicle_registry = HttpVehicleRegistry(
        "http://testserver/sandbox/vehicle-registry", transport=tc._transport
    )
    with tc:
        yield tc


def onboard_lot(
    client: TestClient,
    admin: dict[str, str],
    *,
    code: str,
    district: str,
    tariff: dict[str, Any],
    commission_bps: int = 0,
) -> tuple[dict[str, Any], str]:
    """An operator and one car park of 50 spaces with a connector key, through the admin API;
    returns the lot and the key's private PEM (its key id is the lowercased code)."""
    operator = client.post(
        "/v1/admin/operators",
        headers=admin,
        json={"name": "o", "commission_bps": commission_bps, "settlement_account": "x"},
    ).json()
    private_pem, public_pem = generate_keypair()
    lot = client.post(
        "/v1/admin/lots",
        headers=admin,
        json={
            "code": code,
            "name": "n",
            "district": district,
            "operator_id": operator["id"],
            "capacity": 50,
            "location": {"lat": 31.26, "lng": 120.63},
            "public_keys": [{"key_id": code.lower(), "public_key_pem": public_pem}],
            "tariff": tariff,
        },
    )
    assert lot.status_code == 201, lot.text
    return lot.json(), private_pem
