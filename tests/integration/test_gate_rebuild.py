"""The gate state survives Redis, on real PostgreSQL, Redis and Kafka: a running gateway
notices the loss, rebuilds from billing and sessions over their internal HTTP APIs, refuses
signatures made before the loss, and `citypark gate rebuild` does the same by hand.

Own Redis DB (5), own port, own district and topic: it runs next to the other suites."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from citypark_connector import ConnectorClient, EventState, sign_request
from pydantic import SecretStr
from sqlalchemy import insert

from loadtests.ownership import add_verified_vehicle, proven_row
from services import city
from services.billing.driver.models import Driver
from services.billing.main import part as billing
from services.billing.vehicle.models import Vehicle
from services.gateway.gate import rebuild
from services.gateway.gate import state as gate_state
from services.gateway.main import part as gateway
from services.lots.main import part as lots
from services.sessions.main import part as sessions
from services.sessions.models import ParkingSession, SessionStatus
from shared.events import PostpayStatus
from shared.pii_columns import index_of
from shared.runtime import Runtime
from shared.settings import BusKind, CacheKind, Settings
from tests.conftest import Infra, scratch_database
from tests.integration.sdk_city import admin_call, drop_district_topic, new_district, new_key

pytestmark = pytest.mark.integration
PORT = 18461
REDIS_DB = 5
CHECK_S = 0.5  # the keeper's interval here; the default is 2 s


@dataclass
class Server:
    rt: Runtime
    url: str


@pytest.fixture(scope="module")
def gsettings(infra: Infra) -> Iterator[Settings]:
    with scratch_database(infra) as url:
        s = Settings(
            database_url=url,
            redis_url=infra.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}",
            kafka_bootstrap=infra.kafka_bootstrap,
            bus=BusKind.kafka,
            cache=CacheKind.redis,
            jwt_secret=SecretStr("gate-rebuild-tests-secret-long-enough-for-hs256"),
            sandbox_mode=True,  # drivers sign in with the code from the SMS outbox
            lots_url=f"http://127.0.0.1:{PORT}",
            sessions_url=f"http://127.0.0.1:{PORT}",
            billing_url=f"http://127.0.0.1:{PORT}",
            paysandbox_url=f"http://127.0.0.1:{PORT}/sandbox/pay",
            vehicle_registry_url=f"http://127.0.0.1:{PORT}/sandbox/vehicle-registry",
        )
        city.migrate(s)
        redis.Redis.from_url(s.redis_url).flushdb()
        yield s
        redis.Redis.from_url(s.redis_url).flushdb()


@pytest.fixture(scope="module")
def server(gsettings: Settings) -> Iterator[Server]:
    """Gateway, lots, sessions and billing in one server; of the workers only the gate's
    keeper (the account consumer would join a group other suites share on this broker)."""
    rt = Runtime(gsettings, source="gateway")
    billing.on_startup(rt)
    app = city.build_app(
        rt,
        [gateway, lots, sessions, billing],
        workers=[rebuild.keeper(rt, interval_s=CHECK_S)],
        mount_sandbox=Runtime(gsettings, source="paysandbox"),
    )
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=PORT, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield Server(rt, f"http://127.0.0.1:{PORT}")
    uv.should_exit = True
    thread.join(timeout=15)


@dataclass(frozen=True)
class Lot:
    lot_id: str
    key_id: str
    private_pem: str


@pytest.fixture(scope="module")
def lot(server: Server) -> Iterator[Lot]:
    district = new_district(server)  # type: ignore[arg-type]  # has .url and .rt
    key = new_key()
    operator = admin_call(
        server,  # type: ignore[arg-type]
        "POST",
        "/v1/admin/operators",
        {"name": "o", "commission_bps": 0, "settlement_account": "6222"},
    )
    made = admin_call(
        server,  # type: ignore[arg-type]
        "POST",
        "/v1/admin/lots",
        {
            "code": f"GR-{uuid.uuid4().hex[:6].upper()}",
            "name": "gate rebuild",
            "district": district,
            "operator_id": operator["id"],
            "capacity": 100,
            "location": {"lat": 31.3, "lng": 120.6},
            "public_keys": [{"key_id": key.key_id, "public_key_pem": key.public_pem}],
            "tariff": lots_tariff(),
        },
    )
    yield Lot(str(made["id"]), key.key_id, key.private_pem)
    drop_district_topic(server.rt, district)


def lots_tariff() -> dict[str, Any]:
    from services.lots.schemas import EXAMPLE_TARIFF

    return EXAMPLE_TARIFF


def enrol(server: Server, phone: str, plate: str) -> None:
    """A driver signs in, binds a sandbox agreement and registers a plate (billing's API)."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/v1/auth/otp", json={"phone": phone}).status_code < 300
        sms = admin_call(server, "GET", f"/v1/admin/sandbox/sms?phone={phone}")  # type: ignore[arg-type]
        code = re.search(r"\d{6}", sms[0]["body"]).group(0)  # type: ignore[union-attr]
        token = http.post("/v1/auth/token", json={"phone": phone, "code": code}).json()
        me = {"Authorization": f"Bearer {token['access_token']}"}
        agreement = http.post(
            "/sandbox/pay/v1/agreements",
            json={"holder": "h", "balance_fen": 100_000, "behaviour": "ok"},
        ).json()["agreement_no"]
        bound = http.put(
            "/v1/me/account", headers=me, json={"provider": "sandbox", "agreement_no": agreement}
        )
        assert bound.status_code == 200, bound.text
        add_verified_vehicle(http, me, plate)


def says(server: Server, plate: str) -> str:
    return gate_state.decide(
        server.rt.redis, server.rt.settings, plate=plate, color="blue", postpay_enabled=True
    ).reason


def rebuilt(server: Server) -> dict[str, str] | None:
    marker = rebuild.marker(server.rt.redis)
    return marker if "built_at" in marker else None


def eventually(check: Any, timeout_s: float = 20) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def eligibility_request(server: Server, lot: Lot) -> httpx.Request:
    request = httpx.Request("GET", server.url + "/v1/connector/eligibility")
    return sign_request(request, lot.key_id, lot.private_pem)


def send(request: httpx.Request) -> httpx.Response:
    copy = httpx.Request(request.method, request.url, headers=request.headers)
    with httpx.Client(timeout=30) as http:
        return http.send(copy)


def test_a_flushed_redis_under_the_running_gateway_is_rebuilt_within_seconds(
    server: Server, lot: Lot
) -> None:
    enrol(server, "13900000461", "苏E4R461")
    # The account events travel through Kafka to consumers of other suites' groups here;
    # the keeper built the state at start and a rebuild is what this test is about.
    eventually(lambda: rebuilt(server))
    rebuild.rebuild(server.rt, wait_s=20)
    assert says(server, "苏E4R461") == "enrolled"
    with server.rt.sessionmaker() as db, db.begin():
        db.add(
            ParkingSession(
                lot_id=lot.lot_id,
                lot_code="GR",
                district="gusu",
                operator_id="op",
                plate="苏E4R461",
                plate_color="blue",
                vehicle_type="small",
                status=SessionStatus.open,
                entry_event_id=f"{lot.lot_id}/{uuid.uuid4()}",
                entered_at=datetime.now(UTC) - timedelta(hours=1),
            )
        )
    before = eligibility_request(server, lot)
    assert send(before).status_code == 200
    assert send(before).json()["code"] == "nonce_reused"
    time.sleep(1.1)  # the loss comes a second after the request was signed

    redis.Redis.from_url(server.rt.settings.redis_url).flushdb()
    lost = time.monotonic()
    assert says(server, "苏E4R461") == "not_enrolled"

    marker = eventually(lambda: rebuilt(server))
    took = time.monotonic() - lost
    assert took < 10, f"rebuilt only after {took:.1f} s"
    assert says(server, "苏E4R461") == "enrolled"
    assert server.rt.redis.get(
        gate_state.open_key(server.rt.settings, lot.lot_id, "苏E4R461", "blue")
    )
    print(f"\ngate state back {took:.2f} s after the flush ({marker})")  # noqa: T201

    refused = send(before)
    assert refused.status_code == 401
    assert refused.json()["code"] == "signature_predates_reset"
    assert send(eligibility_request(server, lot)).status_code == 200


def test_the_sdk_recovers_by_itself_when_its_signatures_predate_the_loss(
    server: Server, lot: Lot
) -> None:
    """A car park whose clock runs 3 s behind: right after the loss its fresh signatures
    still predate it; the connector keeps the events and re-signs until they go through."""
    eventually(lambda: rebuilt(server))
    behind = ConnectorClient(
        lot.key_id,
        lot.private_pem,
        base_url=server.url,
        backoff_base_s=0.5,
        backoff_cap_s=2.0,
    )
    behind._auth._clock = lambda: time.time() - 3
    try:
        redis.Redis.from_url(server.rt.settings.redis_url).flushdb()
        server.rt.redis.hset(rebuild.MARKER, "lost_at", rebuild.now_ms())  # noticed now
        lost = time.monotonic()
        first = behind.entry(plate="苏E4R462", plate_color="blue", lane="E1")
        assert first.status == "queued"  # refused for now, kept in the outbox
        event = behind.outbox.get(first.event_id)
        assert event is not None
        assert "signature_predates_reset" in str(event.last_error)
        eventually(lambda: behind.outbox.count(EventState.delivered) == 1, timeout_s=30)
        took = time.monotonic() - lost
        assert took > 2  # not before its clock had passed the loss
        print(f"\nthe connector's entry went through {took:.1f} s after the loss")  # noqa: T201
    finally:
        behind.close()


def test_citypark_gate_rebuild(server: Server, gsettings: Settings) -> None:
    # A larger city straight into billing's tables: 2 500 drivers with a vehicle each.
    with server.rt.sessionmaker() as db, db.begin():
        ids = [str(uuid.uuid4()) for _ in range(2500)]
        db.execute(
            insert(Driver),
            [
                {
                    "id": d,
                    "phone": f"17{i:09}",
                    "phone_bidx": index_of(gsettings, "phone", f"17{i:09}"),
                    "state_version": 1,
                    "postpay_published": PostpayStatus.active.value,
                }
                for i, d in enumerate(ids)
            ],
        )
        db.execute(
            insert(Vehicle),
            [proven_row(d, f"沪C{i:05}", settings=gsettings) for i, d in enumerate(ids)],
        )
    env = {
        **os.environ,
        "CITYPARK_DATABASE_URL": gsettings.database_url,
        "CITYPARK_REDIS_URL": gsettings.redis_url,
        "CITYPARK_CACHE": "redis",
        "CITYPARK_BUS": "kafka",
        "CITYPARK_JWT_SECRET": gsettings.jwt_secret.get_secret_value(),
        "CITYPARK_BILLING_URL": gsettings.billing_url,
        "CITYPARK_SESSIONS_URL": gsettings.sessions_url,
    }
    # Its own process, as ops would run it (and the CLI's logging set-up stays there).
    result = subprocess.run(
        [str(Path(sys.executable).parent / "citypark"), "gate", "rebuild", "--page-size", "500"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert re.match(r"gate state rebuilt: \d+ drivers .* vehicles/s\)$", summary), summary
    drivers = int(summary.split()[3])
    assert drivers >= 2501
    assert says(server, "沪C02499") == "enrolled"
    print(f"\n{summary}")  # noqa: T201
