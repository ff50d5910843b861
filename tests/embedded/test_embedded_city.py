"""The embedded default (`make run`): the same code on SQLite, the log table and an in-process
Redis, in one app. The whole flow, plus what only a single app can show cheaply."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from citypark_connector import ConnectorClient
from fastapi.testclient import TestClient

from loadtests.ownership import backdate_verification, register_in_registry, verify
from services.gateway.gate import state as gate_state
from services.lots.schemas import EXAMPLE_TARIFF
from tests.embedded_city import embedded_city, onboard_lot, wait_for

SHANGHAI = ZoneInfo("Asia/Shanghai")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with embedded_city(tmp_path_factory.mktemp("embedded") / "city.db") as tc:
        yield tc


def admin_headers(client: TestClient) -> dict[str, str]:
    from services.gateway.tokens import service as admin_tokens
    from shared.auth import Role
    from shared.db import transaction

    rt = client.app.state.runtime  # type: ignore[attr-defined]
    with transaction(rt.sessionmaker) as db:
        token = admin_tokens.create(db, rt.secret, Role.admin)
    return {"Authorization": f"Bearer {token}"}


def test_whole_flow_on_the_embedded_default(client: TestClient, tmp_path: Path) -> None:
    admin = admin_headers(client)
    _, private_pem = onboard_lot(
        client, admin, code="EMB-1", district="wuzhong", tariff=EXAMPLE_TARIFF, commission_bps=500
    )

    client.post("/v1/auth/otp", json={"phone": "13800000001"})
    sms = client.get("/v1/admin/sandbox/sms", params={"phone": "13800000001"}, headers=admin).json()
    code = re.search(r"\d{6}", sms[0]["body"]).group(0)  # type: ignore[union-attr]
    assert (
        client.post(
            "/v1/auth/token",
            json={"phone": "13800000001", "code": "000000" if code != "000000" else "111111"},
        ).json()["code"]
        == "otp_invalid"
    )
    token = client.post("/v1/auth/token", json={"phone": "13800000001", "code": code}).json()
    me = {"Authorization": f"Bearer {token['access_token']}"}
    # single use
    assert (
        client.post("/v1/auth/token", json={"phone": "13800000001", "code": code}).status_code
        == 401
    )
    agreement = client.post(
        "/sandbox/pay/v1/agreements", json={"holder": "h", "balance_fen": 10_000}
    ).json()["agreement_no"]
    assert (
        client.put(
            "/v1/me/account", headers=me, json={"provider": "sandbox", "agreement_no": agreement}
        ).status_code
        == 200
    )
    assert (
        client.put(
            "/v1/me/account", headers=me, json={"provider": "sandbox", "agreement_no": "AGR-nope"}
        ).json()["code"]
        == "agreement_invalid"
    )
    first = client.post(
        "/v1/me/vehicles",
        headers={**me, "Idempotency-Key": "v-1"},
        json={"plate": "苏E55555", "plate_color": "blue"},
    )
    replay = client.post(
        "/v1/me/vehicles",
        headers={**me, "Idempotency-Key": "v-1"},
        json={"plate": "苏E55555", "plate_color": "blue"},
    )
    assert first.status_code == replay.status_code == 201
    assert replay.json() == first.json()
    assert replay.headers["idempotent-replayed"] == "true"
    reused = client.post(
        "/v1/me/vehicles",
        headers={**me, "Idempotency-Key": "v-1"},
        json={"plate": "苏E66666", "plate_color": "blue"},
    )
    assert reused.json()["code"] == "idempotency_key_reused"
    # Unproven, the plate opens nothing; proven against the sandbox registry it does. The proof
    # is dated two days back: the stay below is reported a day late, and a driver sees only
    # parkings that began after the proof.
    assert first.json()["status"] == "unverified"
    vin = register_in_registry(client, "苏E55555")
    proved = verify(client, me, first.json()["id"], owner_name="测试车主", vin=vin)
    assert proved.status_code == 200, proved.text
    backdate_verification(
        client.app.state.runtime.sessionmaker,  # type: ignore[attr-defined]
        first.json()["id"],
        datetime.now(SHANGHAI) - timedelta(days=2),
    )

    connector = ConnectorClient(
        "emb-1", private_pem, base_url="http://testserver", transport=client._transport
    )
    assert client.get("/v1/me", headers=me).json()["postpay"] == "active"
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    # The gate learns it from the account event, through the log, within moments.
    wait_for(lambda: gate_state.driver_of(rt.redis, rt.settings, "苏E55555", "blue"))
    # Yesterday 09:00–10:01 in Suzhou: the day period, first hour + one half hour.
    now = (datetime.now(SHANGHAI) - timedelta(days=1)).replace(
        hour=10, minute=1, second=0, microsecond=0
    )
    connector.report_entry(
        plate="苏E55555",
        plate_color="blue",
        vehicle_type="small",
        lane="E",
        occurred_at=now - timedelta(minutes=61),
    )
    decision = connector.report_exit(
        plate="苏E55555", plate_color="blue", lane="X", occurred_at=now
    )
    assert decision.decision == "postpay"
    assert decision.session_id
    charges = wait_for(
        lambda: [
            c for c in client.get("/v1/me/charges", headers=me).json() if c["status"] == "captured"
        ]
    )
    assert [c["amount_fen"] for c in charges] == [650]
    sessions = client.get("/v1/me/sessions", headers=me).json()["items"]
    assert [s["id"] for s in sessions] == [decision.session_id]
    stats = client.get("/v1/admin/stats", headers=admin).json()
    assert (stats["lots_connected"], stats["parkings_served"], stats["captured_fen"]) == (1, 1, 650)
    console = client.get("/console")
    assert console.status_code == 200
    assert "/v1/admin/stats" in console.text
