"""Proof of vehicle ownership, through the whole city: on PostgreSQL (with Redis db 13) and in
the embedded SQLite city.

Registering a plate proves nothing, so an unverified claim opens no post-pay and shows no
parking; the vehicle registry's confirmation of the owner and VIN does. A later proof by
another driver takes the plate over. The old leak — driver B registers A's plate and watches
where A parks — shows B nothing."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from citypark_connector import SignatureAuth
from fastapi.testclient import TestClient
from sqlalchemy import select

from loadtests.ownership import (
    add_verified_vehicle,
    backdate_verification,
    register_in_registry,
    verify,
    vin_for,
)
from services.billing.vehicle.registry import HttpVehicleRegistry
from services.gateway.gate import state as gate_state
from services.gateway.tokens import service as admin_tokens
from services.lots.schemas import EXAMPLE_TARIFF
from services.sessions.models import ParkingSession, SessionStatus
from shared.auth import Role
from shared.db import transaction
from shared.pii_columns import index_in
from shared.runtime import Runtime
from shared.settings import CacheKind
from tests.conftest import Infra, scratch_database
from tests.embedded_city import embedded_city, onboard_lot, wait_for

pytestmark = pytest.mark.integration
REDIS_DB = 13


@dataclass
class City:
    client: TestClient
    rt: Runtime
    admin: dict[str, str]
    lot_id: str
    gate: httpx.Client


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def city(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, infra: Infra
) -> Iterator[City]:
    if request.param == "sqlite":
        with embedded_city(tmp_path_factory.mktemp("ownership") / "city.db") as client:
            yield from _onboard(client)
        return
    redis_url = infra.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    redis.Redis.from_url(redis_url).flushdb()
    with (
        scratch_database(infra) as database_url,
        embedded_city(
            Path("unused"),
            database_url=database_url,
            cache=CacheKind.redis,
            redis_url=redis_url,
        ) as client,
    ):
        yield from _onboard(client)
    redis.Redis.from_url(redis_url).flushdb()


def _onboard(client: TestClient) -> Iterator[City]:
    rt: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    with transaction(rt.sessionmaker) as db:
        admin = {"Authorization": f"Bearer {admin_tokens.create(db, rt.secret, Role.admin)}"}
    code = f"OWN-{uuid.uuid4().hex[:4].upper()}"
    lot, private_pem = onboard_lot(client, admin, code=code, district="gusu", tariff=EXAMPLE_TARIFF)
    gate = httpx.Client(
        base_url="http://testserver",
        transport=client._transport,
        auth=SignatureAuth(code.lower(), private_pem),
    )
    yield City(client, rt, admin, lot["id"], gate)
    gate.close()


def new_plate() -> str:
    return f"苏E{uuid.uuid4().int % 100_000:05d}"


def new_phone() -> str:
    return f"137{uuid.uuid4().int % 100_000_000:08d}"


def driver(city: City, *, agreement: bool = True) -> dict[str, str]:
    """A signed-in driver with a sandbox withholding account bound."""
    client, phone = city.client, new_phone()
    assert client.post("/v1/auth/otp", json={"phone": phone}).status_code < 300
    sms = client.get("/v1/admin/sandbox/sms", params={"phone": phone}, headers=city.admin).json()
    code = re.search(r"\d{6}", sms[0]["body"]).group(0)  # type: ignore[union-attr]
    token = client.post("/v1/auth/token", json={"phone": phone, "code": code}).json()
    me = {"Authorization": f"Bearer {token['access_token']}"}
    if agreement:
        agreement_no = client.post(
            "/sandbox/pay/v1/agreements", json={"holder": "h", "balance_fen": 100_000}
        ).json()["agreement_no"]
        bound = client.put(
            "/v1/me/account", headers=me, json={"provider": "sandbox", "agreement_no": agreement_no}
        )
        assert bound.status_code == 200, bound.text
    return me


def claim(city: City, me: dict[str, str], plate: str) -> dict[str, Any]:
    added = city.client.post(
        "/v1/me/vehicles", headers=me, json={"plate": plate, "plate_color": "blue"}
    )
    assert added.status_code == 201, added.text
    return added.json()  # type: ignore[no-any-return]


def enter(city: City, plate: str, at: datetime) -> None:
    response = city.gate.post(
        "/v1/connector/entries",
        json={
            "event_id": str(uuid.uuid4()),
            "plate": plate,
            "plate_color": "blue",
            "vehicle_type": "small",
            "occurred_at": at.isoformat(),
        },
    )
    assert response.status_code == 202, response.text


def leave(city: City, plate: str, at: datetime) -> dict[str, Any]:
    response = city.gate.post(
        "/v1/connector/exits",
        json={
            "event_id": str(uuid.uuid4()),
            "plate": plate,
            "plate_color": "blue",
            "occurred_at": at.isoformat(),
        },
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def closed_sessions(city: City, plate: str, count: int) -> list[ParkingSession]:
    """The plate's closed sessions (the sessions service's own records), once `count` have."""

    def find() -> list[ParkingSession] | None:
        with city.rt.sessionmaker() as db:
            rows = list(
                db.scalars(
                    select(ParkingSession).where(
                        ParkingSession.plate_bidx == index_in(db, "plate", plate),
                        ParkingSession.status == SessionStatus.closed,
                    )
                )
            )
        return rows if len(rows) >= count else None

    return wait_for(find)


def stay(city: City, plate: str, entered: datetime, exited: datetime) -> dict[str, Any]:
    """One parking at the lot; the exit's answer (the gate decision)."""
    enter(city, plate, entered)
    return leave(city, plate, exited)


def seen_by(city: City, me: dict[str, str]) -> list[str]:
    answer = city.client.get("/v1/me/sessions", headers=me)
    assert answer.status_code == 200, answer.text
    return [s["id"] for s in answer.json()["items"]]


def gate_says(city: City, plate: str) -> gate_state.GateAnswer:
    return gate_state.decide(
        city.rt.redis, city.rt.settings, plate=plate, color="blue", postpay_enabled=True
    )


def notifications(city: City, me: dict[str, str]) -> list[dict[str, Any]]:
    return city.client.get("/v1/me/notifications", headers=me).json()  # type: ignore[no-any-return]


def now() -> datetime:
    """Whole seconds: a stay reported at `now()` may begin just before a proof made now, so
    stays meant to follow a proof begin a second later."""
    return datetime.now(UTC).replace(microsecond=0)


def test_an_unverified_plate_pays_on_site_and_shows_nothing(city: City) -> None:
    me, plate = driver(city), new_plate()
    vehicle = claim(city, me, plate)
    assert (vehicle["status"], vehicle["verified_at"]) == ("unverified", None)
    listed = city.client.get("/v1/me/vehicles", headers=me).json()
    assert [(v["id"], v["status"]) for v in listed] == [(vehicle["id"], "unverified")]
    wait_for(lambda: gate_says(city, plate).reason == "vehicle_unverified")

    t = now()
    answer = stay(city, plate, t - timedelta(minutes=50), t - timedelta(minutes=5))
    # The car park hears `not_eligible`; why (unproven ownership) stays in the city.
    assert (answer["decision"], answer["reason"]) == ("pay_on_site", "not_eligible")
    closed_sessions(city, plate, 1)
    assert seen_by(city, me) == []
    assert city.client.get("/v1/me/passes", headers=me).json() == []
    assert [n for n in notifications(city, me) if n["kind"] == "entry"] == []


def test_a_wrong_owner_or_vin_or_unknown_plate_is_refused(city: City) -> None:
    me, plate, stranger = driver(city), new_plate(), new_plate()
    vin = register_in_registry(city.client, plate, owner_name="王小明")
    vehicle = claim(city, me, plate)
    unknown = claim(city, me, stranger)  # not on the register at all
    for vehicle_id, name, last6 in (
        (vehicle["id"], "王大明", vin[-6:]),
        (vehicle["id"], "王小明", "000000" if vin[-6:] != "000000" else "111111"),
        (unknown["id"], "王小明", vin[-6:]),
    ):
        refused = city.client.post(
            f"/v1/me/vehicles/{vehicle_id}/verification",
            headers=me,
            json={"owner_name": name, "vin_last6": last6},
        )
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "vehicle_verification_failed"
    assert {v["status"] for v in city.client.get("/v1/me/vehicles", headers=me).json()} == {
        "unverified"
    }
    # Names compare normalised (spaces, full-width, case) and the VIN ending case-insensitive.
    proved = city.client.post(
        f"/v1/me/vehicles/{vehicle['id']}/verification",
        headers=me,
        json={"owner_name": "　王小明 ", "vin_last6": vin[-6:].lower()},
    )
    assert proved.status_code == 200, proved.text
    assert proved.json()["status"] == "verified"


def test_latin_names_compare_across_width_and_case(city: City) -> None:
    me, plate = driver(city), new_plate()
    vin = register_in_registry(city.client, plate, owner_name="Li  Lei")
    vehicle = claim(city, me, plate)
    proved = verify(city.client, me, vehicle["id"], owner_name="ＬＩ ｌｅｉ", vin=vin)
    assert proved.status_code == 200, proved.text


def test_an_unreachable_registry_is_503_and_nothing_changes(city: City) -> None:
    me, plate = driver(city), new_plate()
    vehicle = claim(city, me, plate)
    working = city.rt.vehicle_registry
    city.rt.vehicle_registry = HttpVehicleRegistry("http://127.0.0.1:9", timeout=1)
    try:
        answer = verify(city.client, me, vehicle["id"], owner_name="x", vin=vin_for(plate))
    finally:
        city.rt.vehicle_registry = working
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "dependency_unavailable"
    assert city.client.get("/v1/me/vehicles", headers=me).json()[0]["status"] == "unverified"


def test_a_verified_plate_leaves_on_postpay_and_shows_only_parkings_after_the_proof(
    city: City,
) -> None:
    me, plate = driver(city), new_plate()
    claimed = claim(city, me, plate)
    t = now()
    enter(city, plate, t - timedelta(hours=2))  # the car is inside before the proof
    wait_for(lambda: gate_says(city, plate).reason == "vehicle_unverified")
    vin = register_in_registry(city.client, plate, owner_name="张三")
    proved = verify(city.client, me, claimed["id"], owner_name="张三", vin=vin)
    assert proved.status_code == 200, proved.text
    verified_at = datetime.fromisoformat(proved.json()["verified_at"])
    assert proved.json()["status"] == "verified"
    assert verified_at >= t - timedelta(seconds=5)
    wait_for(lambda: gate_says(city, plate).decision == "postpay")

    # The stay that began before the proof ends after it: charged post-pay, never shown.
    straddling = leave(city, plate, now())
    assert (straddling["decision"], straddling["reason"]) == ("postpay", "enrolled")
    after = now() + timedelta(seconds=1)
    later = stay(city, plate, after, after + timedelta(seconds=1))
    assert later["decision"] == "postpay"
    closed = closed_sessions(city, plate, 2)
    me_id = city.client.get("/v1/me", headers=me).json()["id"]
    assert {s.driver_id for s in closed} == {me_id}  # both are the driver's to pay
    assert seen_by(city, me) == [later["session_id"]]
    hidden = city.client.get(f"/v1/me/sessions/{straddling['session_id']}", headers=me)
    assert hidden.status_code == 404
    shown = city.client.get(f"/v1/me/sessions/{later['session_id']}", headers=me)
    assert shown.status_code == 200, shown.text


def test_a_verified_claim_by_another_driver_takes_the_plate_over(city: City) -> None:
    first, second, plate = driver(city), driver(city), new_plate()
    held = add_verified_vehicle(city.client, first, plate, owner_name="赵一")
    backdate_verification(city.rt.sessionmaker, held["id"], now() - timedelta(hours=1))
    wait_for(lambda: gate_says(city, plate).decision == "postpay")
    before = stay(city, plate, now() - timedelta(minutes=30), now() - timedelta(minutes=20))
    wait_for(lambda: seen_by(city, first) == [before["session_id"]])

    # The car is sold: the register now names the buyer, whose claim is not blocked.
    vin = register_in_registry(city.client, plate, owner_name="钱二")
    bought = claim(city, second, plate)
    assert bought["status"] == "unverified"
    assert gate_says(city, plate).decision == "postpay"  # an unproven claim changes nothing
    proved = verify(city.client, second, bought["id"], owner_name="钱二", vin=vin)
    assert proved.status_code == 200, proved.text
    second_id = city.client.get("/v1/me", headers=second).json()["id"]
    wait_for(lambda: gate_says(city, plate).driver_id == second_id)

    old = city.client.get("/v1/me/vehicles", headers=first).json()
    assert [(v["id"], v["status"]) for v in old] == [(held["id"], "superseded")]
    told = wait_for(
        lambda: [n for n in notifications(city, first) if n["kind"] == "vehicle_superseded"]
    )
    assert len(told) == 1
    assert "已被他人认证" in told[0]["title"]

    after = stay(city, plate, now() + timedelta(seconds=1), now() + timedelta(seconds=2))
    assert after["decision"] == "postpay"
    closed_sessions(city, plate, 2)
    assert seen_by(city, second) == [after["session_id"]]
    assert seen_by(city, first) == [before["session_id"]]  # their own past, nothing new

    # The same driver claiming it twice is the one conflict left.
    again = city.client.post(
        "/v1/me/vehicles", headers=second, json={"plate": plate, "plate_color": "blue"}
    )
    assert again.status_code == 409
    assert again.json()["code"] == "vehicle_exists"


def test_registering_a_strangers_plate_shows_the_stranger_nothing(city: City) -> None:
    """The old leak: B registers A's plate and would have seen where A's car parks."""
    owner, snoop, plate = driver(city), driver(city), new_plate()
    add_verified_vehicle(city.client, owner, plate, owner_name="孙三")
    owner_id = city.client.get("/v1/me", headers=owner).json()["id"]
    wait_for(lambda: gate_says(city, plate).driver_id == owner_id)

    taken = claim(city, snoop, plate)  # no 409 that would tell B the plate is someone's
    assert taken["status"] == "unverified"
    guess = verify(city.client, snoop, taken["id"], owner_name="孙三", vin="ABCDEFGHJK0000000")
    assert guess.status_code == 422

    parked = stay(city, plate, now() + timedelta(seconds=1), now() + timedelta(seconds=2))
    assert parked["decision"] == "postpay"  # B's claim does not block the owner either
    closed_sessions(city, plate, 1)
    wait_for(lambda: seen_by(city, owner) == [parked["session_id"]])
    assert seen_by(city, snoop) == []
    peek = city.client.get(f"/v1/me/sessions/{parked['session_id']}", headers=snoop)
    assert peek.status_code == 404
    assert city.client.get("/v1/me/passes", headers=snoop).json() == []
    assert city.client.get("/v1/me/charges", headers=snoop).json() == []
    assert [n for n in notifications(city, snoop) if n["kind"] in ("entry", "exit")] == []
