"""Passes and whitelists (SPEC §10) on real PostgreSQL, Redis and Kafka: pushed through the
signed connector API by the SDK, honoured by the gate (`free`), by quotes and by billing, and
shown to drivers. Own port (18501), own Redis DB (13), own district and topic."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import redis
from citypark_connector import ConnectorClient, ConnectorError, SignatureAuth
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from loadtests.ownership import proven_vehicle
from services.billing.charge import service as charges
from services.billing.charge.models import Charge
from services.billing.driver.models import Driver
from services.billing.vehicle import endpoints as vehicle_endpoints
from services.gateway.gate import state
from shared.auth import issue_driver_token
from shared.events import AccountUpdated, Decision, PostpayStatus, SessionClosed, VehicleRef
from shared.internal import InternalClient
from shared.runtime import Runtime
from shared.settings import Settings
from shared.timeutil import utcnow
from tests.integration.sdk_city import (
    Gateway,
    Lot,
    drop_district_topic,
    new_district,
    new_lot,
)

pytestmark = pytest.mark.integration

PORT = 18501
DEAD_PORT = 18599  # nothing listens here: the city is "away"
REDIS_DB = 13
SHANGHAI = ZoneInfo("Asia/Shanghai")
NIGHT = ("19:00", "08:00")


@pytest.fixture(scope="module")
def psettings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "redis_url": settings.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}",
            "lots_url": f"http://127.0.0.1:{PORT}",
        }
    )


@pytest.fixture(scope="module")
def rt(psettings: Settings) -> Runtime:
    redis.Redis.from_url(psettings.redis_url).flushdb()
    return Runtime(psettings, source="tests")


@pytest.fixture(scope="module")
def gw(rt: Runtime) -> Iterator[Gateway]:
    server = Gateway(rt, PORT)
    # Drivers' passes are billing's route (it knows the driver's vehicles).
    server.app.include_router(vehicle_endpoints.me)
    server.start()
    yield server
    server.stop()
    redis.Redis.from_url(rt.settings.redis_url).flushdb()


@pytest.fixture(scope="module")
def lot(gw: Gateway) -> Iterator[Lot]:
    district = new_district(gw)
    yield new_lot(gw, district)
    drop_district_topic(gw.rt, district)


@pytest.fixture(scope="module", autouse=True)
def _no_charges_left_behind(factory: sessionmaker[Session], lot: Lot) -> Iterator[None]:
    yield
    with factory() as db, db.begin():
        db.execute(delete(Charge).where(Charge.lot_code == lot.code))


@pytest.fixture
def client(gw: Gateway, lot: Lot) -> Iterator[ConnectorClient]:
    with ConnectorClient(lot.key.key_id, lot.key.private_pem, base_url=gw.url) as c:
        yield c


def new_plate() -> str:
    # Serials never use O or I; hex digits are safe.
    return "苏E" + uuid.uuid4().hex[:5].upper().replace("O", "0").replace("I", "1")


def local(day: date, clock: str) -> datetime:
    hours, minutes = clock.split(":")
    return datetime(day.year, day.month, day.day, int(hours), int(minutes), tzinfo=SHANGHAI)


def three_days_ago() -> date:
    return (utcnow().astimezone(SHANGHAI) - timedelta(days=3)).date()


def enrol(rt: Runtime, plate: str) -> str:
    """A driver with an active account, as the gateway learns it from account events."""
    driver_id = str(uuid.uuid4())
    state.apply_account(
        rt.redis,
        rt.settings,
        AccountUpdated(
            driver_id=driver_id,
            version=1,
            postpay=PostpayStatus.active,
            vehicles=[VehicleRef(plate=plate, plate_color="blue", verified=True)],
        ),
    )
    return driver_id


def stay(client: ConnectorClient, plate: str, entered: datetime, exited: datetime) -> Any:
    client.report_entry(
        plate=plate, plate_color="blue", vehicle_type="small", lane="E1", occurred_at=entered
    )
    return client.report_exit(plate=plate, plate_color="blue", lane="X1", occurred_at=exited)


def bill(
    factory: sessionmaker[Session],
    rt: Runtime,
    lot: Lot,
    plate: str,
    entered: datetime,
    exited: datetime,
    decision: Decision,
    driver_id: str,
) -> Charge | None:
    closed = SessionClosed(
        session_id=str(uuid.uuid4()),
        lot_id=lot.lot_id,
        lot_code=lot.code,
        district=lot.district,
        operator_id=str(uuid.uuid4()),
        plate=plate,
        plate_color="blue",
        vehicle_type="small",
        entered_at=entered,
        exited_at=exited,
        decision=decision,
        driver_id=driver_id,
    )
    lots_api = InternalClient(f"http://127.0.0.1:{PORT}", rt.secret)
    with factory() as db, db.begin():
        return charges.open_charge(db, lots_api, closed)


def quote(gw: Gateway, lot: Lot, entered: datetime, exited: datetime, plate: str | None) -> int:
    body: dict[str, Any] = {
        "lot_id": lot.lot_id,
        "entered_at": entered.isoformat(),
        "exited_at": exited.isoformat(),
        "vehicle_type": "small",
        "plate_color": "blue",
    }
    auth = None
    if plate is not None:  # the car park's own signature may quote with a plate
        body["plate"] = plate
        auth = SignatureAuth(lot.key.key_id, lot.key.private_pem)
    answer = httpx.post(gw.url + "/v1/quotes", json=body, timeout=10, auth=auth)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["fee_fen"])


def test_night_pass_bills_only_the_day_part_and_the_quote_agrees(
    gw: Gateway, lot: Lot, client: ConnectorClient, factory: sessionmaker[Session], rt: Runtime
) -> None:
    plate = new_plate()
    driver_id = enrol(rt, plate)
    day = three_days_ago()
    put = client.put_pass(
        f"night-{plate[-5:]}",
        plate=plate,
        plate_color="blue",
        kind="monthly",
        valid_from=day - timedelta(days=1),
        valid_to=day + timedelta(days=5),
        window=NIGHT,
    )
    assert put["status"] == "created"
    entered, exited = local(day, "17:00"), local(day + timedelta(days=1), "09:00")

    decision = stay(client, plate, entered, exited)
    # Partly covered: the driver leaves on post-pay, and pays for the day part alone.
    assert (decision.decision, decision.reason) == ("postpay", "enrolled")
    # §8 by hand: 17:00 first block 500, 18:00 and 18:30 at 150; 19:00–08:00 covered (the
    # 07:00 first block starts inside the window); 08:00 and 08:30 at 150.
    assert quote(gw, lot, entered, exited, plate) == 1100
    assert quote(gw, lot, entered, exited, None) > 1100
    charge = bill(factory, rt, lot, plate, entered, exited, Decision.postpay, driver_id)
    assert charge is not None
    assert charge.amount_fen == 1100


def test_a_stay_inside_the_window_leaves_free_and_is_never_charged(
    gw: Gateway, lot: Lot, client: ConnectorClient, factory: sessionmaker[Session], rt: Runtime
) -> None:
    plate = new_plate()
    driver_id = enrol(rt, plate)
    day = three_days_ago()
    client.put_pass(
        f"n2-{plate[-5:]}",
        plate=plate,
        plate_color="blue",
        kind="monthly",
        valid_from=day - timedelta(days=1),
        valid_to=day + timedelta(days=5),
        window=NIGHT,
    )
    entered, exited = local(day, "20:00"), local(day + timedelta(days=1), "07:30")
    decision = stay(client, plate, entered, exited)
    assert (decision.decision, decision.reason) == ("free", "pass")
    assert decision.session_id is not None
    assert quote(gw, lot, entered, exited, plate) == 0
    # The session closes with the gate's decision: billing opens no charge for it.
    assert bill(factory, rt, lot, plate, entered, exited, Decision.free, driver_id) is None
    # Even were it delivered as post-pay, the price is 0 (recorded as a free charge).
    charge = bill(factory, rt, lot, plate, entered, exited, Decision.postpay, driver_id)
    assert charge is not None
    assert charge.amount_fen == 0


def test_whitelist_then_deleted_falls_back_to_the_normal_decision(
    gw: Gateway, lot: Lot, client: ConnectorClient, rt: Runtime
) -> None:
    plate, enrolled = new_plate(), new_plate()
    enrol(rt, enrolled)
    now = utcnow()
    for p in (plate, enrolled):
        client.put_pass(
            f"wl-{p[-5:]}",
            plate=p,
            plate_color="blue",
            kind="whitelist",
            valid_from=now - timedelta(days=10),
            valid_to=now + timedelta(days=30),
        )
    entered, exited = now - timedelta(hours=5), now - timedelta(minutes=1)
    assert stay(client, plate, entered, exited).decision == "free"
    answer = stay(client, enrolled, entered, exited)
    assert (answer.decision, answer.reason) == ("free", "whitelist")

    client.delete_pass(f"wl-{plate[-5:]}")
    client.delete_pass(f"wl-{plate[-5:]}")  # a repeat changes nothing
    client.delete_pass(f"wl-{enrolled[-5:]}")
    answer = stay(client, plate, entered, exited)
    assert (answer.decision, answer.reason) == ("pay_on_site", "not_eligible")
    answer = stay(client, enrolled, entered, exited)
    assert (answer.decision, answer.reason) == ("postpay", "enrolled")
    assert quote(gw, lot, entered, exited, plate) == quote(gw, lot, entered, exited, None) > 0


def test_a_whitelist_before_the_entry_does_not_cover_the_stay(
    lot: Lot, client: ConnectorClient, rt: Runtime
) -> None:
    plate = new_plate()
    now = utcnow()
    client.put_pass(
        f"late-{plate[-5:]}",
        plate=plate,
        plate_color="blue",
        kind="whitelist",
        valid_from=now - timedelta(hours=2),
        valid_to=now + timedelta(days=1),
    )
    answer = stay(client, plate, now - timedelta(hours=3), now - timedelta(minutes=1))
    assert (answer.decision, answer.reason) == ("pay_on_site", "not_eligible")


def test_put_is_idempotent_and_replaces(client: ConnectorClient) -> None:
    plate = new_plate()
    body: dict[str, Any] = {
        "plate": plate,
        "plate_color": "blue",
        "kind": "monthly",
        "valid_from": date(2026, 1, 1),
        "valid_to": date(2026, 1, 31),
    }
    first = client.put_pass("idem-1", **body)
    assert first["status"] == "created"
    # Dates are whole days on the lot's clock, the last one included.
    assert datetime.fromisoformat(first["valid_from"]) == datetime(2026, 1, 1, tzinfo=SHANGHAI)
    assert datetime.fromisoformat(first["valid_to"]) == datetime(2026, 2, 1, tzinfo=SHANGHAI)
    assert client.put_pass("idem-1", **body)["status"] == "unchanged"
    changed = client.put_pass("idem-1", **{**body, "window": ("22:00", "06:00")})
    assert changed["status"] == "updated"
    assert changed["window"] == {"start": "22:00", "end": "06:00"}


BAD_BODIES = [
    ({"plate": "NOTAPLATE"}, 422, "plate_invalid"),
    ({"plate_color": "purple"}, 422, "plate_color_invalid"),
    ({"kind": "yearly"}, 422, "validation_failed"),
    ({"valid_to": "2026-01-01T00:00:00+08:00"}, 422, "pass_validity_invalid"),
    ({"valid_to": "2046-01-01"}, 422, "pass_validity_invalid"),
    ({"valid_from": "2026-01-02T08:00:00"}, 422, "validation_failed"),  # no offset
    ({"window": {"start": "22:00", "end": "22:00"}}, 422, "pass_window_invalid"),
    ({"window": {"start": "25:00", "end": "06:00"}}, 422, "validation_failed"),
    ({"window": "nights"}, 422, "validation_failed"),
    ({"extra": 1}, 422, "validation_failed"),
]


@pytest.mark.parametrize(("change", "status", "code"), BAD_BODIES)
def test_bad_pass_bodies_are_problems(
    client: ConnectorClient, change: dict[str, Any], status: int, code: str
) -> None:
    body = {
        "plate": new_plate(),
        "plate_color": "blue",
        "kind": "monthly",
        "valid_from": "2026-01-02",
        "valid_to": "2026-03-01",
        "window": None,
    } | change
    with pytest.raises(ConnectorError) as err:
        client.request("PUT", "/v1/connector/passes/bad-1", json=body)
    assert (err.value.http_status, err.value.code) == (status, code)


def test_bad_ids_unknown_passes_and_unsigned_calls(gw: Gateway, client: ConnectorClient) -> None:
    body = {
        "plate": new_plate(),
        "plate_color": "blue",
        "kind": "monthly",
        "valid_from": "2026-01-02",
        "valid_to": "2026-03-01",
    }
    for bad_id in ("has space", "x" * 65):
        with pytest.raises(ConnectorError) as err:
            client.request("PUT", f"/v1/connector/passes/{bad_id}", json=body)
        assert err.value.code == "pass_id_invalid"
    with pytest.raises(ConnectorError) as err:
        client.delete_pass(f"never-{uuid.uuid4().hex[:8]}")
    assert (err.value.http_status, err.value.code) == (404, "pass_unknown")
    unsigned = httpx.put(gw.url + "/v1/connector/passes/p1", json=body, timeout=10)
    assert unsigned.status_code == 401
    assert unsigned.json()["code"] == "signature_missing"


def test_offline_gate_honours_the_last_known_passes(
    gw: Gateway, lot: Lot, client: ConnectorClient, tmp_path: Path
) -> None:
    plate = new_plate()
    day = three_days_ago()
    client.put_pass(
        f"off-{plate[-5:]}",
        plate=plate,
        plate_color="blue",
        kind="monthly",
        valid_from=day,
        valid_to=day + timedelta(days=5),
        window=NIGHT,
    )
    outbox = tmp_path / "outbox.sqlite3"
    with ConnectorClient(
        lot.key.key_id, lot.key.private_pem, base_url=gw.url, outbox_path=outbox
    ) as online:
        snap = online.refresh_eligibility()
        assert any(p.window == NIGHT for p in snap.passes)
    # The city is away; the gate decides from the snapshot kept in the outbox file.
    with ConnectorClient(
        lot.key.key_id,
        lot.key.private_pem,
        base_url=f"http://127.0.0.1:{DEAD_PORT}",
        outbox_path=outbox,
        exit_deadline=0.3,
        timeout=0.3,
    ) as offline:
        at_night = local(day + timedelta(days=1), "03:00")
        answer = offline.exit(plate=plate, plate_color="blue", occurred_at=at_night)
        assert (answer.decision, answer.reason, answer.offline) == ("free", "pass", True)
        by_day = offline.exit(
            plate=plate, plate_color="blue", occurred_at=local(day + timedelta(days=1), "12:00")
        )
        assert by_day.decision != "free"
        # With the entry known, a stay that began by day is not covered.
        assert (
            offline.offline_decision(plate, "blue", at=at_night, entered_at=local(day, "18:00"))[0]
            != "free"
        )


def test_eligibility_changes_its_tag_when_passes_change(client: ConnectorClient) -> None:
    before = client.refresh_eligibility()
    plate = new_plate()
    client.put_pass(
        f"tag-{plate[-5:]}",
        plate=plate,
        plate_color="blue",
        kind="whitelist",
        valid_from=utcnow(),
        valid_to=utcnow() + timedelta(days=1),
    )
    after = client.refresh_eligibility()
    assert after.etag != before.etag
    assert len(after.passes) == len(before.passes) + 1


def test_drivers_see_their_passes_and_nobody_else_s(
    gw: Gateway, lot: Lot, client: ConnectorClient, factory: sessionmaker[Session], rt: Runtime
) -> None:
    mine, theirs = new_plate(), new_plate()
    now = utcnow()
    for p in (mine, theirs):
        client.put_pass(
            f"me-{p[-5:]}",
            plate=p,
            plate_color="blue",
            kind="monthly",
            valid_from=now - timedelta(days=1),
            valid_to=now + timedelta(days=29),
            window=NIGHT,
        )
    with factory() as db, db.begin():
        driver = Driver(phone=f"139{uuid.uuid4().int % 10**8:08d}")
        db.add(driver)
        db.flush()
        db.add(proven_vehicle(driver.id, mine))
        driver_id = driver.id
    token = issue_driver_token(rt.secret, driver_id, 600)
    answer = httpx.get(
        gw.url + "/v1/me/passes", headers={"authorization": f"Bearer {token}"}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    passes = answer.json()
    assert [p["pass_id"] for p in passes] == [f"me-{mine[-5:]}"]
    assert passes[0]["lot_code"] == lot.code
    assert passes[0]["state"] == "active"
    assert passes[0]["window"] == {"start": "19:00", "end": "08:00"}
    assert passes[0]["plate"] != mine  # masked, as on charges
    assert httpx.get(gw.url + "/v1/me/passes", timeout=10).status_code == 401


def test_passes_are_stored_in_utc(client: ConnectorClient) -> None:
    plate = new_plate()
    answer = client.put_pass(
        "utc-1",
        plate=plate,
        plate_color="blue",
        kind="whitelist",
        valid_from=datetime(2026, 3, 1, 8, tzinfo=SHANGHAI),
        valid_to=datetime(2026, 3, 2, tzinfo=UTC),
    )
    assert datetime.fromisoformat(answer["valid_from"]) == datetime(2026, 3, 1, tzinfo=UTC)
