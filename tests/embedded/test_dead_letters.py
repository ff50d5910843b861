"""Dead letters end to end on the embedded default: a bug in billing's consumer sets one closed
session aside (the city goes on), ops see it in `/v1/admin/dead-letters` and with
`citypark deadletters list`, fix the cause, replay it, and the parking is billed once."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from citypark_connector import ConnectorClient
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from loadtests.ownership import add_verified_vehicle
from services.billing.charge import service as charges
from services.cli import app as cli
from services.gateway.gate import state as gate_state
from services.gateway.tokens import service as admin_tokens
from services.lots.schemas import EXAMPLE_TARIFF
from shared.auth import Role
from shared.bus.models import LogRow
from shared.db import transaction
from shared.settings import get_settings
from tests.embedded_city import embedded_city, onboard_lot, wait_for


@pytest.fixture(scope="module")
def city_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deadletters") / "city.db"


@pytest.fixture(scope="module")
def client(city_db: Path) -> Iterator[TestClient]:
    with embedded_city(city_db) as tc:
        yield tc


def _headers(client: TestClient, role: Role) -> dict[str, str]:
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    with transaction(rt.sessionmaker) as db:
        return {"Authorization": f"Bearer {admin_tokens.create(db, rt.secret, role)}"}


def _driver(client: TestClient, admin: dict[str, str], phone: str, plate: str) -> dict[str, str]:
    client.post("/v1/auth/otp", json={"phone": phone})
    sms = client.get("/v1/admin/sandbox/sms", params={"phone": phone}, headers=admin).json()
    code = re.search(r"\d{6}", sms[0]["body"]).group(0)  # type: ignore[union-attr]
    token = client.post("/v1/auth/token", json={"phone": phone, "code": code}).json()
    me = {"Authorization": f"Bearer {token['access_token']}"}
    agreement = client.post(
        "/sandbox/pay/v1/agreements", json={"holder": "h", "balance_fen": 10_000}
    ).json()["agreement_no"]
    client.put(
        "/v1/me/account", headers=me, json={"provider": "sandbox", "agreement_no": agreement}
    )
    add_verified_vehicle(client, me, plate)
    return me


def _dead(client: TestClient, admin: dict[str, str]) -> list[dict[str, Any]]:
    answer = client.get("/v1/admin/dead-letters", headers=admin)
    assert answer.status_code == 200, answer.text
    return answer.json()["dead_letters"]  # type: ignore[no-any-return]


def test_a_bug_sets_one_parking_aside_and_a_replay_bills_it_once(
    client: TestClient, city_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = _headers(client, Role.admin)
    viewer = _headers(client, Role.viewer)
    _, pem = onboard_lot(client, admin, code="DL-1", district="gusu", tariff=EXAMPLE_TARIFF)
    me = _driver(client, admin, "13800000071", "苏E71771")
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    wait_for(lambda: gate_state.driver_of(rt.redis, rt.settings, "苏E71771", "blue"))
    connector = ConnectorClient(
        "dl-1", pem, base_url="http://testserver", transport=client._transport
    )

    real_open = charges.open_charge

    def buggy(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("lot_code")

    monkeypatch.setattr(charges, "open_charge", buggy)
    exit_at = datetime.now(UTC) - timedelta(hours=1)
    connector.report_entry(
        plate="苏E71771",
        plate_color="blue",
        vehicle_type="small",
        lane="E",
        occurred_at=exit_at - timedelta(hours=2),
    )
    decision = connector.report_exit(
        plate="苏E71771", plate_color="blue", lane="X", occurred_at=exit_at
    )
    assert decision.decision == "postpay"
    dead = wait_for(lambda: [d for d in _dead(client, viewer) if d["reason"] == "unexpected"])
    assert [(d["consumer"], d["topic"]) for d in dead] == [
        ("citypark-billing", "citypark.sessions-closed")
    ]
    assert "KeyError" in dead[0]["error"]
    assert client.get("/v1/me/charges", headers=me).json() == []

    # Viewers read; only admins replay. The CLI shows the same.
    refused = client.post(f"/v1/admin/dead-letters/{dead[0]['id']}/replay", headers=viewer)
    assert refused.status_code == 403
    monkeypatch.setenv("CITYPARK_DATABASE_URL", f"sqlite:///{city_db}")
    monkeypatch.setenv("CITYPARK_JWT_SECRET", rt.secret)
    monkeypatch.setenv("CITYPARK_BUS", "log")
    # In-process, the command must not point the city's loggers at the runner's stream.
    monkeypatch.setattr("services.deadletters_cli.configure_logging", lambda *a, **k: None)
    get_settings.cache_clear()
    try:
        listed = CliRunner().invoke(cli, ["deadletters", "list"], env={"COLUMNS": "200"})
    finally:
        get_settings.cache_clear()
    assert listed.exit_code == 0, listed.output
    assert "1 dead letters" in listed.output
    assert "citypark-billing" in listed.output

    # The cause is fixed; ops replay: the parking is billed, once.
    monkeypatch.setattr(charges, "open_charge", real_open)
    replayed = client.post(f"/v1/admin/dead-letters/{dead[0]['id']}/replay", headers=admin)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["replayed_at"] is not None
    captured = wait_for(
        lambda: [
            c for c in client.get("/v1/me/charges", headers=me).json() if c["status"] == "captured"
        ]
    )
    assert len(captured) == 1
    again = client.post(f"/v1/admin/dead-letters/{dead[0]['id']}/replay", headers=admin)
    assert again.json()["code"] == "dead_letter_not_replayable"
    assert _dead(client, viewer) == []  # nothing open any more
    assert client.get("/v1/admin/dead-letters/999999", headers=admin).status_code in (404, 405)
    assert client.post("/v1/admin/dead-letters/999999/replay", headers=admin).json()["code"] == (
        "dead_letter_unknown"
    )


def test_a_record_that_is_not_an_event_is_listed_and_never_replayed(client: TestClient) -> None:
    admin = _headers(client, Role.admin)
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    with transaction(rt.sessionmaker) as db:
        db.add(
            LogRow(
                source="x",
                topic="citypark.sessions-closed",
                key="k",
                event_id="?",
                payload="\u0000 garbage",
            )
        )
    dead = wait_for(lambda: [d for d in _dead(client, admin) if d["reason"] == "undecodable"])
    assert dead[0]["payload"] == "\\x00 garbage"  # kept to read; NUL escaped to be storable
    answer = client.post(f"/v1/admin/dead-letters/{dead[0]['id']}/replay", headers=admin)
    assert answer.status_code == 409
    assert answer.json()["code"] == "dead_letter_not_replayable"
    everything = client.post("/v1/admin/dead-letters/replay", headers=admin, json={})
    assert everything.status_code == 200
    assert everything.json()["skipped_undecodable"] >= 1
