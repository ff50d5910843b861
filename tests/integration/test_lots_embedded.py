"""The same lots features on the embedded default (`make run`: SQLite, the log table as bus, an
in-process Redis): the lots occupancy worker is wired in, the map follows a car park's gates
and heartbeats, the city figures count per district, and a quote equals the charge."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
from citypark_connector import ConnectorClient, generate_keypair
from fastapi.testclient import TestClient

from loadtests.ownership import add_verified_vehicle
from services.gateway.gate import state as gate_state
from services.lots.schemas import EXAMPLE_TARIFF
from shared.auth import Role, issue_admin_token
from tests.embedded_city import embedded_city

SHANGHAI = ZoneInfo("Asia/Shanghai")
T = TypeVar("T")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with embedded_city(tmp_path_factory.mktemp("lots-embedded") / "city.db") as tc:
        yield tc


def eventually(check: Callable[[], T | None], timeout_s: float = 30) -> T:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if (result := check()) is not None:
            return result
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_map_figures_and_prices_on_the_embedded_default(client: TestClient) -> None:
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    token, token_id = issue_admin_token(rt.secret, Role.admin)
    admin = {"Authorization": f"Bearer {token}"}
    op = client.post(
        "/v1/admin/operators",
        headers=admin,
        json={"name": "embedded", "commission_bps": 0, "settlement_account": "x"},
    ).json()
    private_pem, public_pem = generate_keypair()
    key_id = f"emb-lots-{uuid.uuid4().hex[:6]}"
    created = client.post(
        "/v1/admin/lots",
        headers=admin,
        json={
            "code": "EMB-LOTS-1",
            "name": "embedded lot",
            "district": "kunshan",
            "operator_id": op["id"],
            "capacity": 30,
            "location": {"lat": 31.385, "lng": 120.98},
            "public_keys": [{"key_id": key_id, "public_key_pem": public_pem}],
            "tariff": EXAMPLE_TARIFF,
        },
    )
    assert created.status_code == 201, created.text
    lot = created.json()

    def shown() -> dict[str, Any]:
        found = client.get("/v1/lots", params={"near": "31.384,120.98", "radius_m": 500}).json()
        [mine] = [x for x in found if x["id"] == lot["id"]]
        return mine

    assert (shown()["free_spaces"], shown()["online"]) == (30, False)
    assert 100 <= shown()["distance_m"] <= 125

    connector = ConnectorClient(
        key_id, private_pem, base_url="http://testserver", transport=client._transport
    )

    # A driver with post-pay parks here; the gates move the map through the lots worker.
    phone = "13900000077"
    client.post("/v1/auth/otp", json={"phone": phone})
    sms = client.get("/v1/admin/sandbox/sms", params={"phone": phone}, headers=admin).json()
    code = re.search(r"\d{6}", sms[0]["body"]).group(0)  # type: ignore[union-attr]
    access = client.post("/v1/auth/token", json={"phone": phone, "code": code}).json()
    me = {"Authorization": f"Bearer {access['access_token']}"}
    agreement = client.post(
        "/sandbox/pay/v1/agreements", json={"holder": "h", "balance_fen": 100_000}
    ).json()["agreement_no"]
    client.put(
        "/v1/me/account", headers=me, json={"provider": "sandbox", "agreement_no": agreement}
    )
    add_verified_vehicle(client, me, "苏E77777")
    eventually(lambda: gate_state.driver_of(rt.redis, rt.settings, "苏E77777", "blue"))

    entered = datetime.now(SHANGHAI).replace(microsecond=0) - timedelta(hours=3, minutes=7)
    connector.report_entry(
        plate="苏E77777", plate_color="blue", vehicle_type="small", lane="E", occurred_at=entered
    )
    eventually(lambda: shown() if shown()["free_spaces"] == 29 else None)
    # The lot's own count wins; the entry above happened before it and is part of it.
    connector.heartbeat(free_spaces=12, total_spaces=30)
    assert (shown()["free_spaces"], shown()["online"]) == (12, True)

    exited = datetime.now(SHANGHAI).replace(microsecond=0) + timedelta(seconds=1)
    decision = connector.report_exit(
        plate="苏E77777", plate_color="blue", lane="X", occurred_at=exited
    )
    assert decision.decision == "postpay"
    eventually(lambda: shown() if shown()["free_spaces"] == 13 else None)
    answer = client.post(
        "/v1/quotes",
        json={
            "lot_id": lot["id"],
            "entered_at": entered.isoformat(),
            "exited_at": exited.isoformat(),
        },
    ).json()

    def parked_once() -> dict[str, Any] | None:
        figures = client.get("/v1/admin/stats", headers=admin).json()
        return figures if figures.get("parkings_today") == 1 else None

    stats = eventually(parked_once)
    [kunshan] = [d for d in stats["by_district"] if d["district"] == "kunshan"]
    assert (kunshan["lots_connected"], kunshan["lots_online"], kunshan["parkings_today"]) == (
        1,
        1,
        1,
    )
    assert (kunshan["capacity"], kunshan["free_spaces"]) == (30, 13)
    assert (stats["lots_online"], stats["lots_offline"]) == (1, 0)
    assert stats["lots_connected"] == 1

    audit = client.get("/v1/admin/audit", headers=admin).json()["items"]
    assert [(e["action"], e["actor"]) for e in audit] == [
        ("lot.create", token_id),
        ("operator.create", token_id),
    ]

    charges = eventually(
        lambda: (
            [
                c
                for c in client.get("/v1/me/charges", headers=me).json()
                if c["status"] == "captured"
            ]
            or None
        )
    )
    [charge] = charges
    assert charge["amount_fen"] == answer["fee_fen"] > 0

    # The settled charge shows in the lot's district, and only there.
    def settled() -> dict[str, Any] | None:
        figures = client.get("/v1/admin/stats", headers=admin).json()
        return figures if figures["captured_fen"] == charge["amount_fen"] else None

    stats = eventually(settled)
    money = {
        d["district"]: (d["charges_captured"], d["captured_fen"]) for d in stats["by_district"]
    }
    assert money.pop("kunshan") == (1, charge["amount_fen"])
    assert set(money.values()) == {(0, 0)}
    assert sum(d["arrears_fen"] for d in stats["by_district"]) == stats["arrears_fen"] == 0
