"""One parking through every layer, each part its own process, on real Kafka/PostgreSQL/Redis:
admin → driver → connector (signed) → gateway → district adapter → sessions → billing."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from citypark_connector import ConnectorClient, generate_keypair, sign_request
from sqlalchemy.orm import Session, sessionmaker

from loadtests.ownership import (
    add_verified_vehicle,
    backdate_verification,
    register_in_registry,
    verify,
)
from services.gateway.connector.eligibility import Kdf
from services.lots.schemas import EXAMPLE_TARIFF
from shared.db import make_engine, make_sessionmaker
from tests.e2e.conftest import City

pytestmark = pytest.mark.e2e
SHANGHAI = ZoneInfo("Asia/Shanghai")


def eventually(check: Callable[[], Any], timeout_s: float = 60, what: str = "condition") -> Any:
    end = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"{what} not reached in {timeout_s}s (last: {last!r})")


def city_db(city: City) -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(city.env["CITYPARK_DATABASE_URL"]))


def sign_in(http: httpx.Client, admin: dict[str, str], phone: str) -> dict[str, str]:
    assert http.post("/v1/auth/otp", json={"phone": phone}).status_code == 202
    sms = http.get("/v1/admin/sandbox/sms", params={"phone": phone}, headers=admin).json()
    # the newest message holding a code: the city may have texted the driver meanwhile
    code = next(m.group(0) for s in sms if (m := re.search(r"(?<!\d)\d{6}(?!\d)", s["body"])))
    answer = http.post("/v1/auth/token", json={"phone": phone, "code": code})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] > 0
    return {"Authorization": f"Bearer {body['access_token']}"}


def gate_knows(http: httpx.Client, key_id: str, private_pem: str, plate: str) -> None:
    """Wait until the lot's eligibility snapshot holds the plate: the gate learnt the driver
    from billing's account events through Kafka."""

    def listed() -> bool:
        request = http.build_request("GET", "/v1/connector/eligibility")
        body = http.send(sign_request(request, key_id, private_pem)).json()
        kdf = body.get("kdf")
        if not kdf:
            return False
        # The snapshot lists the plate hashed with the salt it names, as the gate looks it up.
        salted = Kdf(salt=kdf["salt"], n=kdf["n"], r=kdf["r"], p=kdf["p"], dklen=kdf["dklen"])
        return salted.hash(plate, "blue") in body["vehicles"]

    eventually(listed, what=f"the gate knowing {plate}")


def test_postpay_parking_flows_through_the_city(city: City) -> None:
    http = httpx.Client(base_url=city.gateway, timeout=20)
    admin = {"Authorization": f"Bearer {city.admin_token()}"}

    # City ops onboard an operator and a car park with its connector key and tariff.
    operator = http.post(
        "/v1/admin/operators",
        headers=admin,
        json={"name": "姑苏停车", "commission_bps": 600, "settlement_account": "6222000011112222"},
    )
    assert operator.status_code == 201, operator.text
    private_pem, public_pem = generate_keypair()
    key_id = f"e2e-{uuid.uuid4().hex[:8]}"
    lot = http.post(
        "/v1/admin/lots",
        headers=admin,
        json={
            "code": f"E2E-{uuid.uuid4().hex[:6]}",
            "name": "观前街停车场",
            "district": "gusu",
            "operator_id": operator.json()["id"],
            "capacity": 300,
            "location": {"lat": 31.3101, "lng": 120.6205},
            "postpay_enabled": True,
            "public_keys": [{"key_id": key_id, "public_key_pem": public_pem}],
            "tariff": EXAMPLE_TARIFF,
        },
    )
    assert lot.status_code == 201, lot.text
    lot_id = lot.json()["id"]

    # A driver signs in, binds a sandbox withholding agreement and registers a plate.
    me = sign_in(http, admin, "13912345678")
    agreement = httpx.post(
        f"{city.sandbox}/v1/agreements",
        json={"holder": "张三", "balance_fen": 100_000, "behaviour": "ok"},
    )
    assert agreement.status_code == 201
    bound = http.put(
        "/v1/me/account",
        headers=me,
        json={"provider": "sandbox", "agreement_no": agreement.json()["agreement_no"]},
    )
    assert bound.status_code == 200, bound.text
    vehicle = http.post(
        "/v1/me/vehicles", headers=me, json={"plate": "苏e·12345", "plate_color": "blue"}
    )
    assert vehicle.status_code == 201, vehicle.text
    assert vehicle.json()["plate"] == "苏E12345"
    assert vehicle.json()["status"] == "unverified"
    # Ownership proven through the registry (its own process); dated two days back, since the
    # stay below is reported a day late and a driver sees only parkings after the proof.
    vin = register_in_registry(http, "苏E12345", owner_name="张三", registry=city.registry)
    proved = verify(http, me, vehicle.json()["id"], owner_name="张三", vin=vin)
    assert proved.status_code == 200, proved.text
    backdate_verification(
        city_db(city), vehicle.json()["id"], datetime.now(UTC) - timedelta(days=2)
    )
    profile = http.get("/v1/me", headers=me).json()
    assert profile["postpay"] == "active"
    assert profile["phone"] == "139****5678"

    connector = ConnectorClient(key_id, private_pem, base_url=city.gateway)
    gate_knows(http, key_id, private_pem, "苏E12345")

    # The car parks for 2 h 10 min, then leaves first and pays afterwards.
    # Yesterday 08:00–10:10 in Suzhou (day period), reported now: a replay-style late report.
    exited = (datetime.now(SHANGHAI) - timedelta(days=1)).replace(
        hour=10, minute=10, second=0, microsecond=0
    )
    entered = exited - timedelta(minutes=130)
    entry = connector.report_entry(
        plate="苏E12345", plate_color="blue", vehicle_type="small", lane="E1", occurred_at=entered
    )
    assert entry.status == "accepted"
    exit_id = str(uuid.uuid4())
    body = {
        "event_id": exit_id,
        "plate": "苏E12345",
        "plate_color": "blue",
        "occurred_at": exited.isoformat(),
        "lane": "X1",
    }
    exit_request = sign_request(
        http.build_request("POST", "/v1/connector/exits", json=body), key_id, private_pem
    )
    gate = http.send(exit_request)
    assert gate.status_code == 200, gate.text
    decision = gate.json()
    assert decision["decision"] == "postpay"
    assert decision["session_id"]

    # The very same signed request again is a replay: refused.
    replay = http.send(exit_request)
    assert replay.status_code == 401
    assert replay.headers["content-type"].startswith("application/problem+json")
    assert replay.json()["code"] == "nonce_reused"

    # The same exit event, signed afresh, is a duplicate: same answer, charged once.
    again = http.send(
        sign_request(
            http.build_request("POST", "/v1/connector/exits", json=body), key_id, private_pem
        )
    )
    assert again.status_code == 200
    assert again.json()["decision"] == "postpay"
    assert again.json()["session_id"] == decision["session_id"]

    quote = http.post(
        "/v1/quotes",
        json={
            "lot_id": lot_id,
            "entered_at": entered.isoformat(),
            "exited_at": exited.isoformat(),
            "vehicle_type": "small",
            "plate_color": "blue",
        },
    )
    assert quote.status_code == 200
    expected_fee = quote.json()["fee_fen"]
    assert expected_fee == 500 + 3 * 150  # first hour, then three started half hours

    charges = eventually(
        lambda: [
            c for c in http.get("/v1/me/charges", headers=me).json() if c["status"] == "captured"
        ],
        what="a captured charge",
    )
    time.sleep(2)  # give a wrongly duplicated charge the time to show up
    all_charges = http.get("/v1/me/charges", headers=me).json()
    assert len(all_charges) == 1
    assert charges[0]["amount_fen"] == expected_fee
    assert charges[0]["session_id"] == decision["session_id"]

    sessions = http.get("/v1/me/sessions", headers=me).json()["items"]
    assert [s["id"] for s in sessions] == [decision["session_id"]]
    assert sessions[0]["status"] == "closed"
    assert sessions[0]["decision"] == "postpay"

    # Another driver cannot see it.
    other = sign_in(http, admin, "13700001111")
    assert http.get(f"/v1/me/sessions/{decision['session_id']}", headers=other).status_code == 404
    assert http.get("/v1/me/charges", headers=other).json() == []

    ledger = http.get("/v1/admin/ledger/check", headers=admin).json()
    assert ledger == {"balanced": True, "sum_fen": 0, "journals": 1, "unbalanced_journals": []}

    stats = http.get("/v1/admin/stats", headers=admin, params={"days": 7}).json()
    assert stats["lots_connected"] >= 1
    assert stats["districts"] == 10
    assert stats["parkings_served"] >= 1
    assert stats["captured_fen"] >= expected_fee
    [gusu] = [d for d in stats["by_district"] if d["district"] == "gusu"]
    assert gusu["captured_fen"] >= expected_fee
    assert gusu["charges_captured"] >= 1
    assert stats["growth"]["period_days"] == 7
    assert http.get("/v1/admin/stats", headers=me).json()["code"] == "forbidden"

    # A stranger's car pays on site.
    stranger = connector.report_exit(plate="苏A88888", plate_color="blue", lane="X1")
    assert (stranger.decision, stranger.reason) == ("pay_on_site", "not_eligible")

    # The driver takes everything the city holds about them, then leaves the city.
    mine = http.get("/v1/me/export", headers=me)
    assert mine.status_code == 200, mine.text
    export = mine.json()
    assert [p["id"] for p in export["parkings"]] == [decision["session_id"]]
    assert [c["session_id"] for c in export["charges"]] == [decision["session_id"]]
    assert [v["plate"] for v in export["vehicles"]] == ["苏E12345"]
    assert export["profile"]["phone"] == "13912345678"
    driver_id = export["profile"]["id"]
    gone = http.delete("/v1/me", headers=me)
    assert gone.status_code == 204, gone.text
    # Every service refuses the old token (billing at once, sessions within its refresh).
    assert http.get("/v1/me", headers=me).json()["code"] == "token_revoked"
    eventually(
        lambda: http.get("/v1/me/sessions", headers=me).status_code == 401,
        timeout_s=15,
        what="sessions refusing the deleted driver's token",
    )
    # The parking stays for the car park and the money, but no longer names a person.
    reason = {"unmasked": "true", "reason": "erasure check in the city flow"}
    kept = eventually(
        lambda: [
            s
            for s in http.get(
                "/v1/admin/sessions", headers=admin, params={"lot_id": lot_id, **reason}
            ).json()
            if s["id"] == decision["session_id"] and s["plate"] != "苏E12345"
        ],
        what="the parking pseudonymised",
    )
    assert kept[0]["plate"].startswith("v_")
    assert kept[0].get("driver_id") in (None, "")
    # The money is kept, anonymised, and the ledger still balances.
    after = http.get("/v1/admin/ledger/check", headers=admin).json()
    assert (after["balanced"], after["sum_fen"], after["journals"]) == (True, 0, 1)
    # The gate forgets the vehicle, and the phone signs in as a new driver.
    eventually(
        lambda: (
            connector.report_exit(plate="苏E12345", plate_color="blue", lane="X1").decision
            == "pay_on_site"
        ),
        what="the gate forgetting the deleted driver's vehicle",
    )
    again_me = sign_in(http, admin, "13912345678")
    fresh = http.get("/v1/me", headers=again_me).json()
    assert fresh["id"] != driver_id
    assert http.get("/v1/me/charges", headers=again_me).json() == []


def test_gateway_documents_the_whole_city(city: City) -> None:
    paths = httpx.get(f"{city.gateway}/openapi.json", timeout=20).json()["paths"]
    for path in (
        "/v1/connector/exits",
        "/v1/admin/lots",
        "/v1/me/sessions",
        "/v1/me/charges",
        "/v1/quotes",
        "/v1/auth/token",
        "/v1/admin/stats",
    ):
        assert path in paths, path


def test_bad_input_answers_problems_never_500(city: City) -> None:
    http = httpx.Client(base_url=city.gateway, timeout=20)
    admin = {"Authorization": f"Bearer {city.admin_token()}"}
    cases: list[tuple[str, str, dict[str, str], Any, int, str]] = [
        ("POST", "/v1/auth/otp", {}, {"phone": "12"}, 422, "phone_invalid"),
        ("POST", "/v1/auth/otp", {}, "not json", 422, "json_invalid"),
        ("GET", "/v1/me", {}, None, 401, "unauthorized"),
        ("GET", "/v1/me", {"Authorization": "Bearer nope"}, None, 401, "unauthorized"),
        ("POST", "/v1/admin/operators", {}, {"name": "x"}, 401, "unauthorized"),
        ("POST", "/v1/admin/operators", admin, {"name": "x"}, 422, "validation_failed"),
        ("POST", "/v1/admin/lots", admin, {"code": "x"}, 422, "validation_failed"),
        ("GET", "/v1/lots", {}, None, 422, "validation_failed"),
        ("GET", "/v1/lots?near=abc", {}, None, 422, "validation_failed"),
        (
            "POST",
            "/v1/quotes",
            {},
            {
                "lot_id": "nope",
                "entered_at": "2026-01-01T00:00:00Z",
                "exited_at": "2026-01-01T01:00:00Z",
            },
            404,
            "lot_unknown",
        ),
        ("POST", "/v1/connector/entries", {}, {"plate": "x"}, 401, "signature_missing"),
        ("GET", "/v1/nothing-here", {}, None, 404, "not_found"),
        ("GET", "/internal/lots/keys/x", {}, None, 404, "not_found"),
    ]
    for method, path, headers, payload, status, code in cases:
        kwargs: dict[str, Any] = {"headers": headers}
        if isinstance(payload, str):
            kwargs["content"] = payload
            kwargs["headers"] = {**headers, "content-type": "application/json"}
        elif payload is not None:
            kwargs["json"] = payload
        answer = http.request(method, path, **kwargs)
        assert answer.status_code == status, (path, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json"), path
        assert answer.json()["code"] == code, (path, answer.json())


def test_signed_bad_events_are_rejected_with_codes(city: City) -> None:
    http = httpx.Client(base_url=city.gateway, timeout=20)
    admin = {"Authorization": f"Bearer {city.admin_token()}"}
    _, key_id, private_pem = onboard_lot(http, admin, "sip", capacity=10)

    def send(path: str, payload: dict[str, Any]) -> httpx.Response:
        return http.send(
            sign_request(http.build_request("POST", path, json=payload), key_id, private_pem)
        )

    now = datetime.now(UTC)
    base = {"event_id": str(uuid.uuid4()), "plate_color": "blue", "lane": "E1"}
    bad_plate = send(
        "/v1/connector/entries", {**base, "plate": "苏EO1234", "occurred_at": now.isoformat()}
    )
    assert (bad_plate.status_code, bad_plate.json()["code"]) == (422, "plate_invalid")
    too_old = send(
        "/v1/connector/entries",
        {**base, "plate": "苏E12345", "occurred_at": (now - timedelta(days=8)).isoformat()},
    )
    assert (too_old.status_code, too_old.json()["code"]) == (422, "occurred_at_out_of_range")

    forged = sign_request(
        http.build_request(
            "POST",
            "/v1/connector/entries",
            json={**base, "plate": "苏E12345", "occurred_at": now.isoformat()},
        ),
        "no-such-key",
        private_pem,
    )
    answer = http.send(forged)
    assert (answer.status_code, answer.json()["code"]) == (401, "key_unknown")

    tampered = sign_request(
        http.build_request(
            "POST",
            "/v1/connector/entries",
            json={**base, "plate": "苏E12345", "occurred_at": now.isoformat()},
        ),
        key_id,
        private_pem,
    )
    tampered_body = json.dumps({**base, "plate": "苏E99999", "occurred_at": now.isoformat()})
    answer = http.post(
        "/v1/connector/entries",
        content=tampered_body,
        headers={k: v for k, v in tampered.headers.items() if k.lower() != "content-length"},
    )
    assert (answer.status_code, answer.json()["code"]) == (401, "digest_mismatch")

    batch = send(
        "/v1/connector/batches",
        {
            "events": [
                {
                    "kind": "entry",
                    **base,
                    "event_id": str(uuid.uuid4()),
                    "plate": "苏E22222",
                    "occurred_at": now.isoformat(),
                },
                {
                    "kind": "entry",
                    **base,
                    "event_id": str(uuid.uuid4()),
                    "plate": "bad",
                    "occurred_at": now.isoformat(),
                },
                {"kind": "teleport", "event_id": str(uuid.uuid4())},
            ]
        },
    )
    assert batch.status_code == 200, batch.text
    assert [r["status"] for r in batch.json()["results"]] == ["accepted", "rejected", "rejected"]
    assert batch.json()["results"][1]["code"] == "plate_invalid"


def onboard_lot(
    http: httpx.Client, admin: dict[str, str], district: str, capacity: int = 50
) -> tuple[str, str, str]:
    """An operator and a car park with a connector key; returns (lot id, key id, private PEM)."""
    operator = http.post(
        "/v1/admin/operators",
        headers=admin,
        json={"name": "op", "commission_bps": 0, "settlement_account": "1"},
    ).json()
    private_pem, public_pem = generate_keypair()
    key_id = f"k-{uuid.uuid4().hex[:8]}"
    created = http.post(
        "/v1/admin/lots",
        headers=admin,
        json={
            "code": f"L-{uuid.uuid4().hex[:6]}",
            "name": "n",
            "district": district,
            "operator_id": operator["id"],
            "capacity": capacity,
            "location": {"lat": 31.3, "lng": 120.6},
            "public_keys": [{"key_id": key_id, "public_key_pem": public_pem}],
            "tariff": EXAMPLE_TARIFF,
        },
    )
    assert created.status_code == 201, created.text
    return created.json()["id"], key_id, private_pem


def test_a_merchant_validation_lowers_the_bill_through_the_whole_city(city: City) -> None:
    """A shop at the car park takes an hour off a customer's stay while the car is inside; the
    exit goes connector → gateway → adapter → sessions → billing, and the charge is the quote
    of the shortened stay; the merchant owes the difference."""
    http = httpx.Client(base_url=city.gateway, timeout=20)
    admin = {"Authorization": f"Bearer {city.admin_token()}"}
    lot_id, key_id, private_pem = onboard_lot(http, admin, "xiangcheng")
    plate = "苏E66666"
    me = sign_in(http, admin, "13955550001")
    agreement = httpx.post(
        f"{city.sandbox}/v1/agreements",
        json={"holder": "李四", "balance_fen": 100_000, "behaviour": "ok"},
    ).json()["agreement_no"]
    bound = http.put(
        "/v1/me/account", headers=me, json={"provider": "sandbox", "agreement_no": agreement}
    )
    assert bound.status_code == 200, bound.text
    add_verified_vehicle(http, me, plate, owner_name="李四", registry=city.registry)
    shop = http.post(
        "/v1/admin/merchants", headers=admin, json={"lot_id": lot_id, "name": "观前街书店"}
    )
    assert shop.status_code == 201, shop.text
    as_shop = {"Authorization": f"Bearer {shop.json()['api_key']}"}

    connector = ConnectorClient(key_id, private_pem, base_url=city.gateway)
    exited = datetime.now(SHANGHAI).replace(microsecond=0) - timedelta(seconds=5)
    entered = exited - timedelta(minutes=150)
    connector.report_entry(
        plate=plate, plate_color="blue", vehicle_type="small", lane="E", occurred_at=entered
    )
    validation = {"plate": plate, "plate_color": "blue", "kind": "minutes", "value": 60}
    # Accepted once sessions has opened the stay (409 `no_open_session` until then).
    given = eventually(
        lambda: (
            answer
            if (
                answer := http.post("/v1/merchants/validations", headers=as_shop, json=validation)
            ).status_code
            == 201
            else None
        ),
        what="the validation accepted",
    ).json()
    assert (given["status"], given["applied_fen"]) == ("pending", None)
    gate_knows(http, key_id, private_pem, plate)
    decision = connector.report_exit(plate=plate, plate_color="blue", lane="X", occurred_at=exited)
    assert decision.decision == "postpay"

    def quoted(until: datetime) -> int:
        body = {"lot_id": lot_id, "entered_at": entered.isoformat(), "exited_at": until.isoformat()}
        return int(http.post("/v1/quotes", json=body).json()["fee_fen"])

    full, shortened = quoted(exited), quoted(exited - timedelta(minutes=60))
    assert full > shortened
    [charge] = eventually(
        lambda: [
            c for c in http.get("/v1/me/charges", headers=me).json() if c["status"] == "captured"
        ],
        what="the captured charge",
    )
    assert charge["session_id"] == decision.session_id
    assert charge["amount_fen"] == shortened
    [applied] = http.get("/v1/merchants/validations", headers=as_shop).json()
    assert (applied["status"], applied["applied_fen"]) == ("applied", full - shortened)
    assert applied["charge_id"] == charge["id"]
    ledger = http.get("/v1/admin/ledger/check", headers=admin).json()
    assert ledger["balanced"] is True
