"""Live occupancy on real Kafka, PostgreSQL and Redis: the lots consumer counts entries and
exits once each, heartbeats correct the count, silent lots go offline, and the map answers
with Redis geo search. City figures per district come from the same data."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest
import redis
from fastapi.testclient import TestClient
from kafka.admin import KafkaAdminClient, NewTopic
from pydantic import SecretStr
from sqlalchemy import update

from services.lots import consumers, occupancy
from services.lots.main import part as lots
from services.lots.models import Occupancy
from services.lots.schemas import EXAMPLE_TARIFF
from shared.auth import Role, internal_token, issue_admin_token
from shared.bus.kafka import KafkaBus
from shared.events import (
    CloudEvent,
    Decision,
    EventType,
    Kind,
    ParkingEvent,
    SessionClosed,
    new_event,
)
from shared.http import make_app
from shared.runtime import Runtime, attach
from shared.settings import Settings
from shared.timeutil import utcnow
from tests.conftest import Infra

pytestmark = pytest.mark.integration

REDIS_DB = 11  # this suite's own Redis database
GUANQIAN = (31.3130, 120.6180)  # a point in the old town
T = TypeVar("T")


@pytest.fixture(scope="module")
def lots_settings(settings: Settings) -> Settings:
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    return settings.model_copy(update={"redis_url": url})


@pytest.fixture(scope="module")
def topics(infra: Infra) -> Iterator[tuple[str, str]]:
    names = tuple(f"citypark.test.lots.{uuid.uuid4().hex[:10]}" for _ in range(2))
    admin = KafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap, client_id="tests-lots")
    admin.create_topics([NewTopic(n, num_partitions=2, replication_factor=1) for n in names])
    yield names[0], names[1]
    admin.delete_topics(list(names))
    admin.close()


@pytest.fixture(scope="module")
def rt(lots_settings: Settings) -> Runtime:
    redis.Redis.from_url(lots_settings.redis_url).flushdb()
    runtime = Runtime(lots_settings, source="lots")
    lots.on_startup(runtime)
    return runtime


@pytest.fixture(scope="module")
def client(rt: Runtime) -> Iterator[TestClient]:
    app = make_app("lots", "")
    attach(app, rt)
    for router in lots.routers:
        app.include_router(router)
    with TestClient(app) as tc:
        yield tc


@pytest.fixture(scope="module")
def consumer(rt: Runtime, topics: tuple[str, str]) -> Iterator[None]:
    """The lots part's own worker, on this module's topics and consumer group."""
    stop = threading.Event()
    group = f"citypark-lots-test-{uuid.uuid4().hex[:8]}"
    [work] = consumers.workers(rt, group=group, topics=topics)
    thread = threading.Thread(target=work, args=(stop,), daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=15)


@pytest.fixture(scope="module")
def bus(infra: Infra) -> Iterator[KafkaBus]:
    b = KafkaBus(infra.kafka_bootstrap, client_id="tests-lots")
    yield b
    b.close()


@pytest.fixture(scope="module")
def admin_headers(lots_settings: Settings) -> dict[str, str]:
    token, _ = issue_admin_token(lots_settings.jwt_secret.get_secret_value(), Role.admin)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def internal(lots_settings: Settings) -> dict[str, str]:
    return {"x-citypark-internal": internal_token(lots_settings.jwt_secret.get_secret_value())}


def eventually(check: Callable[[], T | None], timeout_s: float = 30) -> T:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if (result := check()) is not None:
            return result
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def new_lot(
    client: TestClient, headers: dict[str, str], lat: float, lng: float, **overrides: Any
) -> dict[str, Any]:
    op = client.post(
        "/v1/admin/operators",
        headers=headers,
        json={"name": "occupancy", "commission_bps": 0, "settlement_account": "x"},
    ).json()
    answer = client.post(
        "/v1/admin/lots",
        headers=headers,
        json={
            "code": f"OC-{uuid.uuid4().hex[:10]}",
            "name": "occupancy",
            "district": "gusu",
            "operator_id": op["id"],
            "capacity": 10,
            "location": {"lat": lat, "lng": lng},
            "tariff": EXAMPLE_TARIFF,
            **overrides,
        },
    )
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


# Producers seal the plate (lots reads no plate; any data keys will do).
KEYS = Settings(jwt_secret=SecretStr("integration-secret-long-enough-for-hs256"))


def parking(lot: dict[str, Any], kind: Kind, at: datetime) -> CloudEvent:
    data = ParkingEvent(
        event_id=str(uuid.uuid4()),
        kind=kind,
        lot_id=lot["id"],
        lot_code=lot["code"],
        district=lot["district"],
        operator_id=lot["operator_id"],
        plate=f"苏E{uuid.uuid4().int % 100000:05d}",
        plate_color="blue",
        occurred_at=at,
        received_at=at,
    ).sealed(KEYS)
    kind_type = EventType.parking_entry if kind is Kind.entry else EventType.parking_exit
    return new_event(kind_type, source="tests", data=data)


def near(client: TestClient, lat: float, lng: float, radius_m: int = 2000) -> list[dict[str, Any]]:
    answer = client.get("/v1/lots", params={"near": f"{lat},{lng}", "radius_m": radius_m})
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def on_map(client: TestClient, lot: dict[str, Any]) -> dict[str, Any]:
    lat, lng = lot["location"]["lat"], lot["location"]["lng"]
    [found] = [x for x in near(client, lat, lng, 50) if x["id"] == lot["id"]]
    return found


def free_becomes(client: TestClient, lot: dict[str, Any], free: int) -> dict[str, Any]:
    """Wait for the count, then make sure it stays: a wrong count may pass through the right
    one on its way."""

    def check() -> dict[str, Any] | None:
        shown = on_map(client, lot)
        return shown if shown["free_spaces"] == free else None

    eventually(check)
    time.sleep(1.0)
    shown = on_map(client, lot)
    assert shown["free_spaces"] == free
    return shown


@pytest.mark.usefixtures("consumer")
def test_entries_and_exits_count_once_and_heartbeats_correct_them(
    client: TestClient,
    admin_headers: dict[str, str],
    internal: dict[str, str],
    bus: KafkaBus,
    topics: tuple[str, str],
) -> None:
    parkings, _ = topics
    lat, lng = 31.2000 + uuid.uuid4().int % 1000 / 1e5, 120.4000
    lot = new_lot(client, admin_headers, lat, lng)
    assert on_map(client, lot)["free_spaces"] == 10  # on the map as soon as it is created

    now = utcnow()
    entries = [parking(lot, Kind.entry, now - timedelta(minutes=10)) for _ in range(3)]
    for event in [*entries, entries[0]]:  # one entry delivered twice
        bus.publish(parkings, lot["id"], event)
    bus.publish(parkings, lot["id"], parking(lot, Kind.exit, now - timedelta(minutes=5)))
    seen = free_becomes(client, lot, 8)
    assert seen["online"] is False  # no heartbeat yet

    # The lot's own count replaces ours and marks it online.
    beat = client.post(
        f"/internal/lots/{lot['id']}/heartbeat",
        headers=internal,
        json={"free_spaces": 4, "total_spaces": 10, "sdk_version": "1.0"},
    )
    assert beat.status_code == 204, beat.text
    assert (on_map(client, lot)["free_spaces"], on_map(client, lot)["online"]) == (4, True)

    # An exit that happened before the heartbeat is already in the lot's count.
    bus.publish(parkings, lot["id"], parking(lot, Kind.exit, now - timedelta(minutes=1)))
    bus.publish(parkings, lot["id"], parking(lot, Kind.entry, utcnow()))
    free_becomes(client, lot, 3)

    # The count stays within [0, capacity]: more entries than spaces, then more exits than
    # cars, are both lost at the edge rather than carried.
    for _ in range(5):
        bus.publish(parkings, lot["id"], parking(lot, Kind.entry, utcnow()))
    full = free_becomes(client, lot, 0)
    assert full["capacity"] == 10
    for _ in range(3):
        bus.publish(parkings, lot["id"], parking(lot, Kind.exit, utcnow()))
    free_becomes(client, lot, 3)
    for _ in range(14):
        bus.publish(parkings, lot["id"], parking(lot, Kind.exit, utcnow()))
    free_becomes(client, lot, 10)
    bus.publish(parkings, lot["id"], parking(lot, Kind.entry, utcnow()))
    free_becomes(client, lot, 9)


@pytest.mark.usefixtures("consumer")
def test_silent_lots_go_offline_and_the_map_survives_a_lost_redis(
    client: TestClient, admin_headers: dict[str, str], internal: dict[str, str], rt: Runtime
) -> None:
    lot = new_lot(client, admin_headers, 31.1000 + uuid.uuid4().int % 1000 / 1e5, 120.9)
    client.post(
        f"/internal/lots/{lot['id']}/heartbeat",
        headers=internal,
        json={"free_spaces": 7, "total_spaces": 10, "sdk_version": "1.0"},
    )
    assert on_map(client, lot)["online"] is True
    with rt.sessionmaker() as db, db.begin():
        db.execute(
            update(Occupancy)
            .where(Occupancy.lot_id == lot["id"])
            .values(heartbeat_at=utcnow() - occupancy.OFFLINE_AFTER - timedelta(seconds=1))
        )
    rt.redis.flushdb()  # Redis lost: the map is rebuilt from the database on start-up
    assert near(client, 31.1, 120.9, 5000) == []
    lots.on_startup(rt)
    shown = on_map(client, lot)
    assert (shown["free_spaces"], shown["online"]) == (7, False)
    admin_view = client.get(f"/v1/admin/lots/{lot['id']}", headers=admin_headers).json()
    assert (admin_view["free_spaces"], admin_view["online"]) == (7, False)


def test_geo_search_orders_by_distance_within_the_radius(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    base_lat = 30.5 + uuid.uuid4().int % 1000 / 1e4  # a spot of this test alone
    base_lng = 121.5
    close = new_lot(client, admin_headers, base_lat + 0.001, base_lng)  # ~111 m north
    middle = new_lot(client, admin_headers, base_lat, base_lng + 0.005)  # ~480 m east
    far = new_lot(client, admin_headers, base_lat + 0.05, base_lng)  # ~5.5 km
    found = near(client, base_lat, base_lng, 1000)
    assert [x["id"] for x in found] == [close["id"], middle["id"]]
    assert abs(found[0]["distance_m"] - 111) <= 2
    assert abs(found[1]["distance_m"] - 480) <= 5
    assert "daily cap ¥30.00" in found[0]["tariff_summary"]
    assert far["id"] in [x["id"] for x in near(client, base_lat, base_lng, 6000)]
    assert len(near(client, base_lat, base_lng, 6000)) >= 3
    limited = client.get(
        "/v1/lots", params={"near": f"{base_lat},{base_lng}", "radius_m": 6000, "limit": 1}
    ).json()
    assert [x["id"] for x in limited] == [close["id"]]

    # Moving a lot moves it on the map.
    client.patch(
        f"/v1/admin/lots/{far['id']}",
        headers=admin_headers,
        json={"location": {"lat": base_lat - 0.002, "lng": base_lng}},
    )
    assert far["id"] in [x["id"] for x in near(client, base_lat, base_lng, 1000)]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"near": "31.3"}, "validation_failed"),
        ({"near": "north,east"}, "validation_failed"),
        ({"near": "91,120"}, "validation_failed"),
        ({"near": "nan,120"}, "validation_failed"),
        ({"near": "31.3,120.6", "radius_m": 0}, "validation_failed"),
        ({"near": "31.3,120.6", "radius_m": 50_001}, "validation_failed"),
        ({}, "validation_failed"),
    ],
)
def test_bad_map_queries_are_problems(
    client: TestClient, params: dict[str, Any], code: str
) -> None:
    answer = client.get("/v1/lots", params=params)
    assert (answer.status_code, answer.json()["code"]) == (422, code)


@pytest.mark.usefixtures("consumer")
def test_city_figures_per_district(
    client: TestClient,
    admin_headers: dict[str, str],
    internal: dict[str, str],
    bus: KafkaBus,
    topics: tuple[str, str],
) -> None:
    _, closed_topic = topics
    before = client.get("/internal/lots/stats", headers=internal).json()
    lot = new_lot(client, admin_headers, 31.25, 120.75, district="taicang", capacity=40)
    client.post(
        f"/internal/lots/{lot['id']}/heartbeat",
        headers=internal,
        json={"free_spaces": 30, "total_spaces": 40, "sdk_version": "1.0"},
    )
    today = utcnow()
    yesterday = today - timedelta(days=1, hours=1)
    closings = [today, today, yesterday]
    events = []
    for exited in closings:
        closed = SessionClosed(
            session_id=str(uuid.uuid4()),
            lot_id=lot["id"],
            lot_code=lot["code"],
            district="taicang",
            operator_id=lot["operator_id"],
            plate="苏E12345",
            plate_color="blue",
            vehicle_type="small",
            entered_at=exited - timedelta(hours=1),
            exited_at=exited,
            decision=Decision.postpay,
            driver_id="d",
        ).sealed(KEYS)
        events.append(
            new_event(
                EventType.session_closed,
                source="tests",
                data=closed,
                id_=f"session-closed-{closed.session_id}",
            )
        )
    for event in [*events, events[0]]:  # one closing delivered twice
        bus.publish(closed_topic, event.data["driver_id"], event)

    def district(stats: dict[str, Any], code: str) -> dict[str, Any]:
        [d] = [d for d in stats["by_district"] if d["district"] == code]
        return d

    def settled() -> dict[str, Any] | None:
        stats = client.get("/internal/lots/stats", headers=internal).json()
        grown = district(stats, "taicang")["parkings_served"]
        return stats if grown == district(before, "taicang")["parkings_served"] + 3 else None

    eventually(settled)
    time.sleep(1.0)  # the repeated closing, had it counted, would show by now
    after = settled()
    assert after is not None
    was, now = district(before, "taicang"), district(after, "taicang")
    assert now["parkings_today"] - was["parkings_today"] == 2  # 25 h ago is another day
    assert now["lots_connected"] - was["lots_connected"] == 1
    assert now["lots_online"] - was["lots_online"] == 1
    assert now["capacity"] - was["capacity"] == 40
    assert now["free_spaces"] - was["free_spaces"] == 30
    assert now["name"] == "太仓市"
    assert after["lots_online"] + after["lots_offline"] == after["lots_connected"]
    assert after["lots_connected"] == sum(d["lots_connected"] for d in after["by_district"])
    assert after["parkings_today"] == sum(d["parkings_today"] for d in after["by_district"])
    assert after["districts"] == len(after["by_district"]) >= 10
