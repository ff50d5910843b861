"""Exits the gate decided offline, replayed later: the city honours an offline `postpay` it
can back (a snapshot it served the car park, in which the vehicle was eligible, during an outage
of the car park; tests/embedded/test_offline_bounds.py shows what it does not back).

The requests are signed with the connector's key but written by hand, so that each rule of
the gateway is shown on its own; one test then runs the connector itself against the city, to
show that both sides agree on the field."""

from __future__ import annotations

import itertools
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

import httpx
import pytest
from citypark_connector import ConnectorClient, SignatureAuth
from fastapi.testclient import TestClient
from sqlalchemy import select

from loadtests.ownership import add_verified_vehicle, backdate_verification
from services.gateway.gate import state as gate_state
from services.gateway.tokens import service as admin_tokens
from services.lots.schemas import EXAMPLE_TARIFF
from shared.auth import Role
from shared.bus.models import LogRow
from shared.db import transaction
from shared.events import (
    AccountUpdated,
    CloudEvent,
    LotEvent,
    ParkingEvent,
    PostpayStatus,
    VehicleRef,
    session_id_for,
)
from shared.runtime import Runtime
from shared.topics import PARKING_EVENTS, lot_events
from tests.embedded_city import embedded_city, onboard_lot, wait_for

DISTRICT = "wuzhong"
UNIT_FEN = 25_000  # one hour costs more than the arrears limit (20 000): one decline suspends
T = TypeVar("T")


def _hourly(fen: int) -> dict[str, Any]:
    return {"periods": [{"start": "00:00", "end": "00:00", "unit_minutes": 60, "unit_fen": fen}]}


TARIFF = {**EXAMPLE_TARIFF, "free_minutes": 0, "rates": {"small": _hourly(UNIT_FEN)}}
TARIFF["rates"]["large"] = _hourly(UNIT_FEN)


@dataclass
class City:
    client: TestClient
    rt: Runtime
    admin: dict[str, str]
    lot_id: str
    gate: httpx.Client
    private_pem: str


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Iterator[City]:
    with embedded_city(tmp_path_factory.mktemp("offline") / "city.db") as client:
        rt: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
        with transaction(rt.sessionmaker) as db:
            admin = {"Authorization": f"Bearer {admin_tokens.create(db, rt.secret, Role.admin)}"}
        lot, private_pem = onboard_lot(
            client, admin, code="OFF-1", district=DISTRICT, tariff=TARIFF
        )
        gate = httpx.Client(
            base_url="http://testserver",
            transport=client._transport,
            auth=SignatureAuth("off-1", private_pem),
        )
        yield City(client, rt, admin, lot["id"], gate, private_pem)
        gate.close()


_serial = itertools.count(70_000)


def new_plate() -> str:
    return f"苏E{next(_serial)}"  # one per test: no stay of another test in the way


def gate_driver(
    city: City, plate: str, postpay: PostpayStatus, driver_id: str | None = None, version: int = 1
) -> str:
    """What the gateway knows of a driver, as the account events would tell it."""
    driver_id = driver_id or str(uuid.uuid4())
    vehicles = [VehicleRef(plate=plate, plate_color="blue", verified=True)]
    account = AccountUpdated(
        driver_id=driver_id, version=version, postpay=postpay, vehicles=vehicles
    )
    assert gate_state.apply_account(city.rt.redis, city.rt.settings, account)
    return driver_id


def served_now(city: City) -> int:
    """The car park fetches its eligibility snapshot (the city keeps it as served)."""
    answer = city.gate.get("/v1/connector/eligibility")
    assert answer.status_code == 200, answer.text
    return int(answer.json()["version"])


def cut_off(city: City, seconds: float = 5) -> str:
    """The car park's line was down for the last `seconds`: its last request reached the city
    then. Returns an instant inside the outage, for `decided_at`."""
    now = time.time()
    city.rt.redis.set(f"citypark:gw:lot:{city.lot_id}:seen", int((now - seconds) * 1000))
    return datetime.fromtimestamp(now - seconds / 2, UTC).isoformat()


def offline(decision: str, **overrides: Any) -> dict[str, Any]:
    return {
        "decision": decision,
        "reason": "enrolled" if decision == "postpay" else "not_eligible",
        "eligibility_version": 41,
        "decided_at": (datetime.now(UTC) - timedelta(minutes=3)).isoformat(),
    } | overrides


def exit_body(plate: str, *, at: datetime | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "plate": plate,
        "plate_color": "blue",
        "occurred_at": (at or datetime.now(UTC) - timedelta(minutes=3)).isoformat(),
        "lane": "X1",
    } | extra


def enter(city: City, plate: str, at: datetime) -> str:
    event_id = str(uuid.uuid4())
    response = city.gate.post(
        "/v1/connector/entries",
        json={
            "event_id": event_id,
            "plate": plate,
            "plate_color": "blue",
            "vehicle_type": "small",
            "occurred_at": at.isoformat(),
            "lane": "E1",
        },
    )
    assert response.status_code == 202, response.text
    return session_id_for(city.lot_id, event_id)


def leave(city: City, body: dict[str, Any]) -> dict[str, Any]:
    response = city.gate.post("/v1/connector/exits", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def lot_event(city: City, event_id: str) -> LotEvent:
    with city.rt.sessionmaker() as db:
        row = db.scalar(
            select(LogRow).where(
                LogRow.topic == lot_events(DISTRICT), LogRow.event_id == f"{city.lot_id}/{event_id}"
            )
        )
    assert row is not None, "the exit was not published"
    return LotEvent.model_validate(CloudEvent.from_json(row.payload).data)


def same_promise(recorded: dict[str, Any] | None, sent: dict[str, Any]) -> bool:
    """The offline decision on an event is the one sent (the time in its JSON form)."""
    if recorded is None:
        return False
    at = datetime.fromisoformat(recorded["decided_at"].replace("Z", "+00:00"))
    return {**recorded, "decided_at": at} == {
        **sent,
        "decided_at": datetime.fromisoformat(sent["decided_at"]),
    }


def parking_event(city: City, event_id: str) -> ParkingEvent:
    def find() -> ParkingEvent | None:
        with city.rt.sessionmaker() as db:
            rows = db.scalars(
                select(LogRow).where(
                    LogRow.topic == PARKING_EVENTS, LogRow.payload.contains(event_id)
                )
            ).all()
        return (
            ParkingEvent.model_validate(CloudEvent.from_json(rows[0].payload).data)
            if rows
            else None
        )

    return wait_for(find)


# -- an offline postpay for a driver suspended since ---------------------------------------


def sign_in(city: City, phone: str) -> dict[str, str]:
    client = city.client
    assert client.post("/v1/auth/otp", json={"phone": phone}).status_code < 300
    sms = client.get("/v1/admin/sandbox/sms", params={"phone": phone}, headers=city.admin).json()
    code = re.search(r"\d{6}", sms[0]["body"]).group(0)  # type: ignore[union-attr]
    token = client.post("/v1/auth/token", json={"phone": phone, "code": code}).json()
    return {"Authorization": f"Bearer {token['access_token']}"}


def test_offline_postpay_is_charged_to_a_driver_suspended_since(city: City) -> None:
    client = city.client
    me = sign_in(city, "13800000077")
    agreement = client.post(
        "/sandbox/pay/v1/agreements",
        json={"holder": "h", "balance_fen": 0, "behaviour": "insufficient_funds"},
    ).json()["agreement_no"]
    bound = client.put(
        "/v1/me/account", headers=me, json={"provider": "sandbox", "agreement_no": agreement}
    )
    assert bound.status_code == 200, bound.text
    car = new_plate()
    vehicle = add_verified_vehicle(client, me, car)
    # Proven before the stays below began (they are reported hours late): the driver sees them.
    backdate_verification(
        city.rt.sessionmaker, vehicle["id"], datetime.now(UTC) - timedelta(days=1)
    )
    redis = city.rt.redis

    def gate_says() -> gate_state.GateAnswer:
        return gate_state.decide(
            redis, city.rt.settings, plate=car, color="blue", postpay_enabled=True
        )

    wait_for(lambda: gate_says().decision == "postpay")
    version = served_now(city)
    now = datetime.now(UTC).replace(microsecond=0)

    # A first stay is declined (no money): the arrears suspend post-pay, and the gate learns it.
    enter(city, car, now - timedelta(hours=6))
    first = leave(city, exit_body(car, at=now - timedelta(hours=5)))
    assert (first["decision"], first["reason"]) == ("postpay", "enrolled")
    wait_for(lambda: gate_says().reason == "suspended_arrears")
    deposit = client.post(
        f"/sandbox/pay/v1/agreements/{agreement}/deposits", json={"amount_fen": 100_000}
    )
    assert deposit.status_code == 200, deposit.text

    # Meanwhile the gate, cut off, had let the car out of its second stay on post-pay.
    session_id = enter(city, car, now - timedelta(hours=3))
    promise = offline("postpay", eligibility_version=version, decided_at=cut_off(city))
    body = exit_body(car, at=now - timedelta(hours=2), offline_decision=promise)
    answer = leave(city, body)

    assert answer == {
        "event_id": body["event_id"],
        "decision": "postpay",
        "reason": "offline_snapshot",
        "session_id": session_id,
        "status": "accepted",
    }
    assert leave(city, body) == {**answer, "status": "duplicate"}
    event = lot_event(city, body["event_id"])
    assert (event.decision, event.reason, event.driver_id) == (
        "postpay",
        "offline_snapshot",
        gate_says().driver_id,
    )
    assert same_promise(event.offline_decision, promise)

    # Sessions and billing treat it as any post-pay exit: the driver is charged.
    charge = wait_for(
        lambda: next(
            (
                c
                for c in client.get("/v1/me/charges", headers=me).json()
                if c["session_id"] == session_id and c["status"] == "captured"
            ),
            None,
        )
    )
    assert charge["amount_fen"] == UNIT_FEN
    sessions = client.get("/v1/me/sessions", headers=me).json()["items"]
    closed = next(s for s in sessions if s["id"] == session_id)
    assert (closed["decision"], closed["reason"]) == ("postpay", "offline_snapshot")
    # The first stay's decline is still owed: a promise kept does not clear arrears.
    assert gate_says().reason == "suspended_arrears"


# -- the other rules, against the gateway's own view of drivers -----------------------------


@pytest.mark.parametrize("now_status", [PostpayStatus.suspended, PostpayStatus.no_account])
def test_offline_postpay_is_honoured_while_the_vehicle_has_a_driver(
    city: City, now_status: PostpayStatus
) -> None:
    car = new_plate()
    driver_id = gate_driver(city, car, PostpayStatus.active)
    version = served_now(city)
    gate_driver(city, car, now_status, driver_id, version=2)
    promise = offline("postpay", eligibility_version=version, decided_at=cut_off(city))
    body = exit_body(car, offline_decision=promise)

    answer = leave(city, body)

    assert (answer["decision"], answer["reason"]) == ("postpay", "offline_snapshot")
    event = lot_event(city, body["event_id"])
    assert (event.decision, event.reason, event.driver_id) == (
        "postpay",
        "offline_snapshot",
        driver_id,
    )


def test_offline_postpay_for_a_vehicle_nobody_owns_keeps_the_promise_on_the_event(
    city: City,
) -> None:
    car = new_plate()
    driver_id = gate_driver(city, car, PostpayStatus.active)
    version = served_now(city)
    enter(city, car, datetime.now(UTC) - timedelta(hours=1))
    # The driver gives the car up meanwhile: an account without it.
    account = AccountUpdated(
        driver_id=driver_id, version=2, postpay=PostpayStatus.active, vehicles=[]
    )
    assert gate_state.apply_account(city.rt.redis, city.rt.settings, account)
    promise = offline("postpay", eligibility_version=version, decided_at=cut_off(city))
    body = exit_body(car, offline_decision=promise)

    answer = leave(city, body)

    assert (answer["decision"], answer["reason"]) == ("pay_on_site", "not_eligible")
    event = lot_event(city, body["event_id"])
    assert (event.decision, event.reason, event.driver_id) == ("pay_on_site", "not_enrolled", None)
    assert same_promise(event.offline_decision, promise)
    # Past the district adapter too, for whoever reads the parking events.
    parked = parking_event(city, body["event_id"])
    assert parked.offline_decision == event.offline_decision


def test_offline_pay_on_site_is_never_charged_again(city: City) -> None:
    """The driver paid at the gate: enrolled since or not, nothing is charged afterwards."""
    car = new_plate()
    gate_driver(city, car, PostpayStatus.active)
    suspended = new_plate()
    gate_driver(city, suspended, PostpayStatus.suspended)
    enrolled_now = exit_body(car, offline_decision=offline("pay_on_site"))
    still_suspended = exit_body(suspended, offline_decision=offline("pay_on_site"))

    answer = leave(city, enrolled_now)
    assert (answer["decision"], answer["reason"]) == ("pay_on_site", "offline_snapshot")
    assert leave(city, still_suspended)["reason"] == "not_eligible"
    event = lot_event(city, enrolled_now["event_id"])
    assert (event.decision, event.reason) == ("pay_on_site", "offline_snapshot")
    assert event.driver_id is not None  # known, but not charged: the gate took the money
    assert same_promise(event.offline_decision, enrolled_now["offline_decision"])


def test_an_offline_postpay_the_city_agrees_with_is_plain_enrolled(city: City) -> None:
    car = new_plate()
    gate_driver(city, car, PostpayStatus.active)
    answer = leave(city, exit_body(car, offline_decision=offline("postpay")))
    assert (answer["decision"], answer["reason"]) == ("postpay", "enrolled")


def test_without_the_field_exits_are_decided_as_before(city: City) -> None:
    active, suspended, stranger = new_plate(), new_plate(), new_plate()
    gate_driver(city, active, PostpayStatus.active)
    gate_driver(city, suspended, PostpayStatus.suspended)
    answers = [leave(city, exit_body(p)) for p in (active, suspended, stranger)]

    # The car park learns `not_eligible`, never why; the city's own record keeps the reason.
    assert [(a["decision"], a["reason"]) for a in answers] == [
        ("postpay", "enrolled"),
        ("pay_on_site", "not_eligible"),
        ("pay_on_site", "not_eligible"),
    ]
    events = [lot_event(city, a["event_id"]) for a in answers]
    assert [e.reason for e in events] == ["enrolled", "suspended_arrears", "not_enrolled"]
    assert all(e.offline_decision is None for e in events)


def test_a_pass_still_lets_the_car_out_free(city: City) -> None:
    car = new_plate()
    gate_driver(city, car, PostpayStatus.suspended)
    today = date.today()
    put = city.gate.put(
        f"/v1/connector/passes/staff-{car[-5:]}",
        json={
            "plate": car,
            "plate_color": "blue",
            "kind": "whitelist",
            "valid_from": (today - timedelta(days=2)).isoformat(),
            "valid_to": (today + timedelta(days=2)).isoformat(),
        },
    )
    assert put.status_code in (200, 201), put.text
    enter(city, car, datetime.now(UTC) - timedelta(hours=1))

    answer = leave(city, exit_body(car, offline_decision=offline("postpay")))

    assert (answer["decision"], answer["reason"]) == ("free", "whitelist")


def test_batches_carry_the_offline_decision_per_item(city: City) -> None:
    suspended, stranger = new_plate(), new_plate()
    driver_id = gate_driver(city, suspended, PostpayStatus.active)
    version = served_now(city)
    gate_driver(city, suspended, PostpayStatus.suspended, driver_id, version=2)
    promise = offline("postpay", eligibility_version=version, decided_at=cut_off(city))
    honoured = {"kind": "exit", **exit_body(suspended, offline_decision=promise)}
    invalid = {"kind": "exit", **exit_body(stranger, offline_decision=offline("later"))}
    plain = {"kind": "exit", **exit_body(suspended)}

    response = city.gate.post("/v1/connector/batches", json={"events": [honoured, invalid, plain]})

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["status"], r["decision"], r["reason"]) for r in results] == [
        ("accepted", "postpay", "offline_snapshot"),
        ("rejected", None, None),
        ("accepted", "pay_on_site", "not_eligible"),
    ]
    assert results[1]["code"] == "validation_failed"
    assert results[1]["detail"].startswith("offline_decision.decision")
    assert same_promise(
        lot_event(city, honoured["event_id"]).offline_decision, honoured["offline_decision"]
    )
    assert lot_event(city, plain["event_id"]).offline_decision is None


class Uplink(httpx.BaseTransport):
    """The car park's line to the city, which can be cut."""

    def __init__(self, city: TestClient) -> None:
        self.inner = city._transport
        self.down = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("line cut", request=request)
        return self.inner.handle_request(request)


def test_the_connector_and_the_city_agree_on_the_replayed_field(city: City) -> None:
    car = new_plate()
    driver_id = gate_driver(city, car, PostpayStatus.active)
    uplink = Uplink(city.client)
    connector = ConnectorClient(
        "off-1",
        city.private_pem,
        base_url="http://testserver",
        transport=uplink,
        eligibility_refresh_s=3600,
    )
    try:
        connector.refresh_eligibility()
        gate_driver(city, car, PostpayStatus.suspended, driver_id, version=2)
        uplink.down = True

        at_gate = connector.exit(plate=car, plate_color="blue", lane="X1")

        assert (at_gate.decision, at_gate.offline) == ("postpay", True)
        time.sleep(1.2)  # an outage the city can tell from its silence (over 1 s)
        uplink.down = False
        assert connector.flush(timeout=10) == 0
        stored = connector.outbox.get(at_gate.event_id)
        assert stored is not None
        assert stored.state.value == "delivered"
        assert stored.answer is not None
        assert (stored.answer["decision"], stored.answer["reason"]) == (
            "postpay",
            "offline_snapshot",
        )
    finally:
        connector.close()
    event = lot_event(city, at_gate.event_id)
    assert event.offline_decision is not None
    assert (event.reason, event.offline_decision["decision"]) == ("offline_snapshot", "postpay")


def _now(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


@pytest.mark.parametrize(
    ("promise", "code"),
    [
        ("postpay", "validation_failed"),
        ({"decision": "postpay"}, "validation_failed"),
        (offline("maybe"), "validation_failed"),
        (offline("postpay", decided_at="2026-11-25T10:45:00"), "validation_failed"),
        (offline("postpay", decided_at="yesterday"), "validation_failed"),
        (offline("postpay", eligibility_version=-1), "validation_failed"),
        (offline("postpay", eligibility_version="v7"), "validation_failed"),
        (offline("postpay", reason="x" * 41), "validation_failed"),
        (offline("postpay", signed_by="gate"), "validation_failed"),
        (offline("postpay", decided_at=_now(hours=1)), "offline_decision_invalid"),
        (offline("postpay", decided_at=_now(days=-8)), "offline_decision_invalid"),
    ],
)
def test_an_invalid_offline_decision_is_a_422_problem(
    city: City, promise: object, code: str
) -> None:
    car = new_plate()
    gate_driver(city, car, PostpayStatus.suspended)
    body = exit_body(car, offline_decision=promise)

    response = city.gate.post("/v1/connector/exits", json=body)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code
    # Nothing was recorded: the same exit, sent right, is new to the city.
    del body["offline_decision"]
    assert leave(city, body)["status"] == "accepted"


def test_openapi_documents_the_field_with_an_example(city: City) -> None:
    spec = city.client.get("/openapi.json").json()
    field = spec["components"]["schemas"]["ExitIn"]["properties"]["offline_decision"]
    assert "offline_snapshot" in field["description"]
    example = field["examples"][0]
    assert set(example) == {"decision", "reason", "eligibility_version", "decided_at"}
    responses = spec["paths"]["/v1/connector/exits"]["post"]["responses"]["422"]
    assert "offline_decision_invalid" in str(responses)
