"""The gate state survives Redis losing its data, on the embedded default (whole city, one
process): the gateway notices, rebuilds from billing and sessions, and refuses signatures
made before the loss."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from citypark_connector import sign_request
from fastapi.testclient import TestClient
from sqlalchemy import select

from loadtests.ownership import add_verified_vehicle
from services.gateway.gate import consumers as gate_consumers
from services.gateway.gate import rebuild
from services.gateway.gate import state as gate_state
from services.gateway.tokens import service as admin_tokens
from services.lots.schemas import EXAMPLE_TARIFF
from shared.auth import Role
from shared.bus.models import DeadLetter
from shared.db import transaction
from shared.events import EventType, VehicleRef, new_event, session_id_for
from shared.runtime import Runtime
from shared.topics import ACCOUNT_EVENTS
from tests.embedded_city import embedded_city, onboard_lot, wait_for

DISTRICT = "gusu"
PLATE = "苏E7R001"


@dataclass
class City:
    client: TestClient
    rt: Runtime
    admin: dict[str, str]
    lot_id: str
    key_id: str
    private_pem: str


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Iterator[City]:
    with embedded_city(tmp_path_factory.mktemp("rebuild") / "city.db") as client:
        rt: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
        with transaction(rt.sessionmaker) as db:
            admin = {"Authorization": f"Bearer {admin_tokens.create(db, rt.secret, Role.admin)}"}
        lot, private_pem = onboard_lot(
            client, admin, code="RB-1", district=DISTRICT, tariff=EXAMPLE_TARIFF
        )
        yield City(client, rt, admin, lot["id"], "rb-1", private_pem)


def signed(city: City, path: str, body: dict[str, Any]) -> httpx.Request:
    request = httpx.Request(
        "POST",
        "http://testserver" + path,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    return sign_request(request, city.key_id, city.private_pem)


def send(city: City, request: httpx.Request) -> httpx.Response:
    with httpx.Client(transport=city.client._transport) as http:
        return http.send(request)


def entry(plate: str) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "plate": plate,
        "plate_color": "blue",
        "vehicle_type": "small",
        "occurred_at": (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
        "lane": "E1",
    }


def enrol(city: City, phone: str, plate: str) -> None:
    client = city.client
    assert client.post("/v1/auth/otp", json={"phone": phone}).status_code < 300
    sms = client.get("/v1/admin/sandbox/sms", params={"phone": phone}, headers=city.admin).json()
    code = re.search(r"\d{6}", sms[0]["body"]).group(0)  # type: ignore[union-attr]
    token = client.post("/v1/auth/token", json={"phone": phone, "code": code}).json()
    me = {"Authorization": f"Bearer {token['access_token']}"}
    agreement = client.post(
        "/sandbox/pay/v1/agreements",
        json={"holder": "h", "balance_fen": 100_000, "behaviour": "ok"},
    ).json()["agreement_no"]
    bound = client.put(
        "/v1/me/account", headers=me, json={"provider": "sandbox", "agreement_no": agreement}
    )
    assert bound.status_code == 200, bound.text
    add_verified_vehicle(client, me, plate)


def gate_says(city: City, plate: str) -> gate_state.GateAnswer:
    return gate_state.decide(
        city.rt.redis, city.rt.settings, plate=plate, color="blue", postpay_enabled=True
    )


def test_redis_losing_its_data_under_the_running_city(city: City) -> None:
    enrol(city, "13800000311", PLATE)
    wait_for(lambda: gate_says(city, PLATE).decision == "postpay")
    # The car is parked: the sessions service holds its open session.
    body = entry(PLATE)
    before = signed(city, "/v1/connector/entries", body)
    assert send(city, before).status_code == 202
    session_id = session_id_for(city.lot_id, body["event_id"])
    open_key = gate_state.open_key(city.rt.settings, city.lot_id, PLATE, "blue")
    wait_for(
        lambda: city.client.get(
            "/v1/admin/sessions",
            params={"plate": PLATE, "status": "open", "unmasked": "true", "reason": "rebuild test"},
            headers=city.admin,
        ).json()
    )
    replay = httpx.Request("POST", before.url, content=before.content, headers=before.headers)
    assert send(city, replay).json()["code"] == "nonce_reused"
    time.sleep(1.1)  # the loss comes a second after the request was signed

    city.rt.redis.flushall()  # Redis restarts empty (or is flushed by mistake)
    assert gate_says(city, PLATE).reason == "not_enrolled"
    lost = time.monotonic()

    # The captured request, sent again: its nonce went with the data, its date gives it away.
    replay = httpx.Request("POST", before.url, content=before.content, headers=before.headers)
    refused = send(city, replay)
    assert refused.status_code == 401
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["code"] == "signature_predates_reset"
    # A request signed now goes through.
    assert send(city, signed(city, "/v1/connector/entries", entry("苏E7R999"))).status_code == 202

    lost_at = int(rebuild.marker(city.rt.redis)["lost_at"])
    assert lost_at // 1000 > int(before.headers["signature-input"].split("created=")[1][:10])

    def rebuilt() -> dict[str, str] | None:
        marker = rebuild.marker(city.rt.redis)
        return marker if "built_at" in marker else None

    marker = wait_for(rebuilt, timeout_s=20)
    took = time.monotonic() - lost
    assert took < 20, f"the gate state was rebuilt only after {took:.1f} s"
    assert int(marker["lost_at"]) == lost_at
    assert gate_says(city, PLATE).decision == "postpay"
    assert city.rt.redis.get(open_key) == session_id
    assert (
        gate_state.entered_at(city.rt.redis, city.rt.settings, city.lot_id, PLATE, "blue")
        is not None
    )


def test_an_account_event_that_cannot_apply_is_kept_as_a_dead_letter(city: City) -> None:
    # A well-formed event whose payload is not an account snapshot.
    event = new_event(
        EventType.account_updated,
        source="billing",
        data=VehicleRef(plate="苏E00000", plate_color="blue").sealed(city.rt.settings),
        subject="nobody",
    )
    city.rt.bus.publish_many([(ACCOUNT_EVENTS, "nobody", event)])

    def parked() -> DeadLetter | None:
        with city.rt.sessionmaker() as db:
            return db.scalar(
                select(DeadLetter).where(
                    DeadLetter.consumer == gate_consumers.GROUP, DeadLetter.event_id == event.id
                )
            )

    row = wait_for(parked, timeout_s=20)
    assert row.topic == ACCOUNT_EVENTS
