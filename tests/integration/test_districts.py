"""District platforms end to end on the real infrastructure (PostgreSQL, Redis db 9, Kafka):
an eleventh district added through the admin API takes records in each dialect, answers per
record, and its adapter turns them into canonical events; an adapter killed mid-stream loses
and doubles nothing; generated junk never causes a 500."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from citypark_connector import SignatureAuth, generate_keypair
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from sqlalchemy import func, select

from services import city
from services.gateway.districts import service as gw_districts
from services.lots.districts import adapter
from services.lots.schemas import EXAMPLE_TARIFF
from shared import pii
from shared.bus.models import InboxRow, LogRow
from shared.internal import InternalClient
from shared.runtime import Runtime
from shared.settings import Settings
from shared.timeutil import utcnow
from shared.topics import PARKING_EVENTS, lot_events

pytestmark = pytest.mark.integration

REDIS_DB = 9  # this suite's own Redis database
ROOT = Path(__file__).resolve().parents[2]
SHANGHAI_OFFSET = timedelta(hours=8)


@pytest.fixture(scope="module")
def dsettings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"}
    )


@pytest.fixture(scope="module")
def rt(dsettings: Settings) -> Runtime:
    return Runtime(dsettings, source="gateway")


@pytest.fixture(scope="module")
def client(rt: Runtime) -> Iterator[TestClient]:
    # The parts whose HTTP the gateway calls, in one app; no background workers.
    parts = [city.PARTS[name] for name in ("gateway", "lots", "sessions", "billing")]
    app = city.build_app(rt, parts, workers=[])
    city.provision.configure(rt.settings)
    with TestClient(app) as tc:
        for service in ("lots", "sessions", "billing"):
            rt.internal_clients[service] = InternalClient(
                "http://testserver", rt.secret, transport=tc._transport
            )
        yield tc


@pytest.fixture(scope="module")
def admin(client: TestClient, rt: Runtime) -> dict[str, str]:
    from services.gateway.tokens import service as admin_tokens
    from shared.auth import Role
    from shared.db import transaction

    with transaction(rt.sessionmaker) as db:
        return {"Authorization": f"Bearer {admin_tokens.create(db, rt.secret, Role.admin)}"}


@pytest.fixture(scope="module")
def operator_id(client: TestClient, admin: dict[str, str]) -> str:
    answer = client.post(
        "/v1/admin/operators",
        headers=admin,
        json={"name": "district ops", "commission_bps": 500, "settlement_account": "acct"},
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


@dataclass
class District:
    code: str
    dialect: str
    key_id: str
    private_pem: str
    lots: list[str]  # lot codes

    def auth(self) -> SignatureAuth:
        return SignatureAuth(self.key_id, self.private_pem)


@pytest.fixture(scope="module")
def new_district(
    client: TestClient, admin: dict[str, str], operator_id: str, rt: Runtime
) -> Iterator[Callable[[str], District]]:
    """Adds a district (an "eleventh") through the admin API, with two car parks."""
    made: list[str] = []

    def make(dialect: str) -> District:
        code = f"d{uuid.uuid4().hex[:10]}"
        private_pem, public_pem = generate_keypair()
        key_id = f"{code}-platform"
        answer = client.post(
            "/v1/admin/districts",
            headers=admin,
            json={
                "code": code,
                "name": f"第十一区 {code}",
                "dialect": dialect,
                "public_keys": [{"key_id": key_id, "public_key_pem": public_pem}],
            },
        )
        assert answer.status_code == 201, answer.text
        made.append(code)
        lots = []
        for n in range(2):
            lot_code = f"{code.upper()}-{n}"
            answer = client.post(
                "/v1/admin/lots",
                headers=admin,
                json={
                    "code": lot_code,
                    "name": lot_code,
                    "district": code,
                    "operator_id": operator_id,
                    "capacity": 100,
                    "location": {"lat": 31.3, "lng": 120.6},
                    "tariff": EXAMPLE_TARIFF,
                },
            )
            assert answer.status_code == 201, answer.text
            lots.append(lot_code)
        return District(code, dialect, key_id, private_pem, lots)

    yield make
    admin_client = KafkaAdminClient(bootstrap_servers=rt.settings.kafka_bootstrap)
    try:
        existing = set(admin_client.list_topics())
        admin_client.delete_topics([lot_events(c) for c in made if lot_events(c) in existing])
    finally:
        admin_client.close()


@pytest.fixture(autouse=True)
def _clean_redis(dsettings: Settings) -> Iterator[None]:
    yield
    redis.Redis.from_url(dsettings.redis_url).flushdb()


def local(at: Any) -> str:
    return (at + SHANGHAI_OFFSET).strftime("%Y%m%d%H%M%S")


def body_for(d: District, records: list[dict[str, Any]]) -> bytes:
    """Records `{serial, lot, plate, color, kind, at}` in the district's dialect."""
    if d.dialect == "legacy-json":
        codes = {"blue": 0, "yellow": 1, "black": 2, "white": 3, "green": 4}
        return json.dumps(
            [
                {
                    "tccbh": r["lot"],
                    "cph": r["plate"],
                    "cpys": codes.get(r["color"], 9),
                    "crlx": 1 if r["kind"] == "entry" else 2,
                    "sj": local(r["at"]),
                    "lsh": r["serial"],
                }
                for r in records
            ],
            ensure_ascii=False,
        ).encode()
    if d.dialect == "xml":
        events = "".join(
            f'<event type="{r["kind"]}"><lot>{r["lot"]}</lot><plate>{r["plate"]}</plate>'
            f"<color>{r['color']}</color><time>{r['at'].isoformat()}</time>"
            f"<id>{r['serial']}</id></event>"
            for r in records
        )
        return f"<events>{events}</events>".encode()
    if d.dialect == "csv":
        lines = ["lot,plate,color,kind,time,id"] + [
            f"{r['lot']},{r['plate']},{r['color']},{r['kind']},{r['at'].isoformat()},{r['serial']}"
            for r in records
        ]
        return ("\ufeff" + "\r\n".join(lines) + "\r\n").encode()
    return json.dumps(
        {
            "events": [
                {
                    "kind": r["kind"],
                    "event_id": r["serial"],
                    "lot": r["lot"],
                    "plate": r["plate"],
                    "plate_color": r["color"],
                    "occurred_at": r["at"].isoformat(),
                }
                for r in records
            ]
        },
        ensure_ascii=False,
    ).encode()


def serial(d: District) -> str:
    return str(uuid.uuid4()) if d.dialect == "canonical" else f"S{uuid.uuid4().hex[:12]}"


def record(d: District, **overrides: Any) -> dict[str, Any]:
    base = {
        "serial": serial(d),
        "lot": d.lots[0],
        "plate": "苏E12345",
        "color": "blue",
        "kind": "entry",
        "at": utcnow().replace(microsecond=0) - timedelta(minutes=30),
    }
    return {**base, **overrides}


def push(client: TestClient, d: District, body: bytes, code: str | None = None) -> Any:
    return client.post(
        f"/v1/districts/{code or d.code}/events",
        content=body,
        auth=d.auth(),
        headers={"content-type": "application/octet-stream"},
    )


def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        return dict(consumer.end_offsets(parts))
    finally:
        consumer.close()


def read_ids(bootstrap: str, since: dict[TopicPartition, int], prefix: str) -> list[str]:
    """Every event id on the topic after `since` that starts with `prefix` (repeats kept)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        consumer.assign(list(since))
        for tp, offset in since.items():
            consumer.seek(tp, offset)
        ends = consumer.end_offsets(list(since))
        ids: list[str] = []
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < ends[tp] for tp in since):
            assert time.monotonic() < deadline, "could not read the topic to its end"
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    event_id = json.loads(r.value)["id"]
                    if event_id.startswith(prefix):
                        ids.append(event_id)
        return ids
    finally:
        consumer.close()


def wait_for(check: Callable[[], Any], timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def run_adapter_threads(rt: Runtime, code: str) -> tuple[threading.Event, list[threading.Thread]]:
    stop = threading.Event()
    threads = [
        threading.Thread(target=w, args=(stop,), daemon=True) for w in adapter.workers(rt, code)
    ]
    for t in threads:
        t.start()
    return stop, threads


def inbox_count(rt: Runtime, code: str) -> int:
    with rt.sessionmaker() as db:
        return int(
            db.scalar(
                select(func.count())
                .select_from(InboxRow)
                .where(InboxRow.consumer == adapter.group_of(code))
            )
            or 0
        )


# --- the eleventh district, every dialect ---------------------------------------------------


@pytest.mark.parametrize("dialect", ["canonical", "legacy-json", "xml", "csv"])
def test_an_eleventh_district_takes_records_end_to_end(
    client: TestClient,
    rt: Runtime,
    new_district: Callable[[str], District],
    admin: dict[str, str],
    dialect: str,
) -> None:
    d = new_district(dialect)
    kafka = rt.settings.kafka_bootstrap
    # Its topic exists as soon as the district does: nothing was restarted.
    admin_client = KafkaAdminClient(bootstrap_servers=kafka)
    assert lot_events(d.code) in admin_client.list_topics()
    admin_client.close()

    other = new_district("canonical")
    now = utcnow().replace(microsecond=0)
    good_entry = record(d, plate="苏ＥＡ１２３４", kind="entry")
    good_exit = record(d, plate="苏EA1234", kind="exit", at=now - timedelta(minutes=5))
    records = [
        good_entry,
        record(d, plate="苏E1234O"),  # letter O in the serial
        record(d, lot="NO-SUCH-LOT"),
        record(d, lot=other.lots[0]),  # a car park of another district
        record(d, at=now - timedelta(days=8)),  # beyond the 7-day replay window
        record(d, color="purple"),
        good_exit,
    ]
    since = end_offsets(kafka, PARKING_EVENTS)
    answer = push(client, d, body_for(d, records))
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert (out["received"], out["accepted"], out["duplicates"], out["rejected"]) == (7, 2, 0, 5)
    by_index = {r["index"]: r for r in out["results"]}
    assert [by_index[i]["status"] for i in range(7)] == [
        "accepted", "rejected", "rejected", "rejected", "rejected", "rejected", "accepted",
    ]  # fmt: skip
    assert [by_index[i]["code"] for i in (1, 2, 3, 4, 5)] == [
        "plate_invalid",
        "lot_unknown",
        "lot_other_district",
        "occurred_at_out_of_range",
        "plate_color_invalid",
    ]
    assert by_index[0]["serial"] == good_entry["serial"]

    # The same batch again: the good ones are duplicates by serial, the bad ones still rejected.
    again = push(client, d, body_for(d, records)).json()
    assert (again["accepted"], again["duplicates"], again["rejected"]) == (0, 2, 5)

    # The adapter (its own consumer group) turns them into canonical events, ids kept.
    stop, threads = run_adapter_threads(rt, d.code)
    try:
        expected = {by_index[0]["event_id"], by_index[6]["event_id"]}
        got = wait_for(
            lambda: (
                (ids := read_ids(kafka, since, f"district/{d.code}/"))
                and set(ids) == expected
                and ids
            ),
        )
        assert sorted(got) == sorted(expected)  # each once
        with rt.sessionmaker() as db:
            rows = db.scalars(
                select(LogRow).where(LogRow.source == adapter.source_of(d.code))
            ).all()
        payloads = {r.event_id: json.loads(r.payload) for r in rows}
        entry = payloads[by_index[0]["event_id"]]
        assert entry["type"] == "citypark.parking.entry"
        assert "plate" not in entry["data"]  # sealed: never in clear on the canonical topic
        assert pii.decrypt(rt.settings, entry["data"]["plate_enc"]) == "苏EA1234"  # folded
        assert entry["data"]["dialect"] == dialect
        assert entry["data"]["district"] == d.code
        assert entry["data"]["lot_code"] == d.lots[0]
        assert datetime.fromisoformat(entry["data"]["occurred_at"]) == good_entry["at"]
        # District figures for ops: the gateway's counts and the adapter's, side by side.
        stats = wait_for(
            lambda: next(
                (
                    f
                    for f in client.get("/v1/admin/stats", headers=admin).json()["district_feeds"]
                    if f["district"] == d.code and f["entries"] + f["exits"] == 2
                ),
                None,
            )
        )
        assert (stats["accepted"], stats["duplicates"], stats["rejected"]) == (2, 2, 10)
        assert stats["rejects"]["lot_other_district"] == 2
        assert stats["events_per_min"] >= 2
        assert stats["last_event_at"] is not None
        assert wait_for(
            lambda: (
                client.get("/v1/admin/stats", headers=admin).json()["district_feeds"]
                and any(
                    f["district"] == d.code and f["consumer_lag"] == 0
                    for f in client.get("/v1/admin/stats", headers=admin).json()["district_feeds"]
                )
            )
        )
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
    metrics = client.get("/metrics/districts").text
    labels = f'dialect="{dialect}",district="{d.code}",reason="lot_unknown",status="rejected"'
    assert f"citypark_district_records_total{{{labels}}} 2.0" in metrics


def test_the_adapter_rechecks_the_district_and_counts_its_rejects(
    client: TestClient, rt: Runtime, new_district: Callable[[str], District], admin: dict[str, str]
) -> None:
    """Between the gateway's answer and the adapter, a car park may leave the district."""
    d = new_district("csv")
    answer = push(client, d, body_for(d, [record(d), record(d, lot=d.lots[1])])).json()
    assert answer["accepted"] == 2
    from services.lots.models import Lot
    from shared.db import transaction

    with transaction(rt.sessionmaker) as db:
        moved = db.scalars(select(Lot).where(Lot.code == d.lots[1])).one()
        moved.district = new_district("csv").code
    stop, threads = run_adapter_threads(rt, d.code)
    try:
        wait_for(lambda: inbox_count(rt, d.code) == 2)
        feed = wait_for(
            lambda: next(
                (
                    f
                    for f in client.get("/v1/admin/stats", headers=admin).json()["district_feeds"]
                    if f["district"] == d.code and f["adapter_rejects"]
                ),
                None,
            )
        )
        assert feed["adapter_rejects"] == {"lot_other_district": 1}
        assert feed["entries"] == 1
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)


# --- the HTTP edge ----------------------------------------------------------------------------


def test_keys_bodies_and_budgets(
    client: TestClient, rt: Runtime, new_district: Callable[[str], District]
) -> None:
    d = new_district("xml")
    other = new_district("xml")
    ok = body_for(d, [record(d)])
    # Another district's key may not push for this one.
    wrong = push(client, other, ok, code=d.code)
    assert wrong.status_code == 403
    assert wrong.json()["code"] == "district_key_mismatch"
    # Unsigned.
    unsigned = client.post(f"/v1/districts/{d.code}/events", content=ok)
    assert unsigned.status_code == 401
    # An XML bomb, an empty body, a 10 MB body.
    bomb = (ROOT / "tests/golden/districts/xml/billion_laughs.xml").read_bytes()
    answer = push(client, d, bomb)
    assert (answer.status_code, answer.json()["code"]) == (422, "xml_forbidden")
    answer = push(client, d, b"")
    assert (answer.status_code, answer.json()["code"]) == (422, "body_empty")
    big = b"<events>" + b"<!-- padding -->" * (10 * 1024 * 1024 // 16) + b"</events>"
    answer = push(client, d, big)
    assert (answer.status_code, answer.json()["code"]) == (413, "body_too_large")
    # More records than a batch may hold.
    many = body_for(d, [record(d) for _ in range(gw_districts.Limits().max_records + 1)])
    answer = push(client, d, many)
    assert (answer.status_code, answer.json()["code"]) == (413, "batch_too_large")
    # Over the district's records budget: 429 with Retry-After, and nothing taken.
    rt.providers[gw_districts.PROVIDER] = gw_districts.Limits(records_per_min=3)
    try:
        first = push(client, d, body_for(d, [record(d), record(d)]))
        assert first.status_code == 200
        second = push(client, d, body_for(d, [record(d), record(d)]))
        assert second.status_code == 429
        assert second.json()["code"] == "rate_limited"
        assert int(second.headers["retry-after"]) >= 1
    finally:
        rt.providers.pop(gw_districts.PROVIDER)


good_then_junk = st.lists(
    st.one_of(
        st.text(max_size=30),
        st.integers(),
        st.none(),
        st.sampled_from(["苏E1234I", "20240230081000", "", "\ufeff", "<x/>", "\x00"]),
    ),
    min_size=1,
    max_size=5,
)


@hsettings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(junk=good_then_junk, dialect=st.sampled_from(["legacy-json", "csv", "xml"]))
def test_generated_junk_never_500s_and_never_drops_a_good_neighbour(
    client: TestClient, new_district: Callable[[str], District], junk: list[Any], dialect: str
) -> None:
    d = _districts.get(dialect) or _districts.setdefault(dialect, new_district(dialect))
    good = record(d)
    fields = ["lot", "plate", "color", "kind", "at", "serial"]
    bad = [
        {**record(d), fields[i % len(fields)]: value}
        if fields[i % len(fields)] != "at"
        else {**record(d), "at": utcnow() + timedelta(days=1)}
        for i, value in enumerate(junk)
    ]
    try:
        body = body_for(d, [*bad[: len(bad) // 2], good, *bad[len(bad) // 2 :]])
    except (TypeError, AttributeError, ValueError):
        return  # the junk could not even be written in this dialect
    answer = push(client, d, body)
    assert answer.status_code < 500, answer.text
    if answer.status_code == 200:
        mine = [r for r in answer.json()["results"] if r["serial"] == good["serial"]]
        assert [r["status"] for r in mine] == ["accepted"]
    else:
        assert answer.json()["code"]  # a problem with a code, e.g. an XML body made unreadable


_districts: dict[str, District] = {}


# --- an adapter killed mid-stream ---------------------------------------------------------------


def test_an_adapter_killed_mid_stream_loses_and_doubles_nothing(
    client: TestClient, rt: Runtime, new_district: Callable[[str], District], dsettings: Settings
) -> None:
    d = new_district("legacy-json")
    total = 4000
    serials: list[str] = []
    for start in range(0, total, 1000):
        batch = [
            record(d, lot=d.lots[i % 2], kind="entry" if i % 2 else "exit")
            for i in range(start, start + 1000)
        ]
        serials += [r["serial"] for r in batch]
        answer = push(client, d, body_for(d, batch))
        assert answer.json()["accepted"] == 1000
    expected = {gw_districts.event_id_for(d.code, s) for s in serials}
    since = end_offsets(rt.settings.kafka_bootstrap, PARKING_EVENTS)
    env = {
        **os.environ,
        "CITYPARK_DATABASE_URL": dsettings.database_url,
        "CITYPARK_REDIS_URL": dsettings.redis_url,
        "CITYPARK_KAFKA_BOOTSTRAP": dsettings.kafka_bootstrap,
        "CITYPARK_BUS": "kafka",
        "CITYPARK_CACHE": "redis",
        "CITYPARK_JWT_SECRET": dsettings.jwt_secret.get_secret_value(),
        "CITYPARK_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "services.cli", "run", "district", d.code]
    first = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: inbox_count(rt, d.code) > 0, timeout_s=60)
        first.send_signal(signal.SIGKILL)  # no goodbye: mid-poll, mid-relay
        first.wait(timeout=10)
        taken_at_kill = inbox_count(rt, d.code)
    finally:
        if first.poll() is None:
            first.kill()
    assert taken_at_kill < total, "the adapter finished before it could be killed"
    second = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: inbox_count(rt, d.code) == total, timeout_s=120)
        with rt.sessionmaker() as db:

            def relayed() -> bool:
                return not db.scalar(
                    select(func.count())
                    .select_from(LogRow)
                    .where(LogRow.source == adapter.source_of(d.code), LogRow.relayed_at.is_(None))
                )

            wait_for(relayed, timeout_s=60)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
    with rt.sessionmaker() as db:
        written = db.scalars(
            select(LogRow.event_id).where(LogRow.source == adapter.source_of(d.code))
        ).all()
    assert len(written) == total  # each record became one canonical event, in effect once
    assert set(written) == expected
    on_kafka = read_ids(rt.settings.kafka_bootstrap, since, f"district/{d.code}/")
    assert set(on_kafka) == expected  # nothing lost
    # A repeat on the wire can only be a relay cut between publish and mark: same id, deduped
    # by sessions. It is bounded by one relay batch.
    assert len(on_kafka) - total <= 200
    figures = redis.Redis.from_url(dsettings.redis_url, decode_responses=True).hgetall(
        f"citypark:district:{d.code}:stats"
    )
    assert int(figures["entry"]) + int(figures["exit"]) == total  # counted once each


# --- backfill ---------------------------------------------------------------------------------

CLI_PORT = 18210  # this suite's port range is 18200-18299


@pytest.fixture(scope="module")
def served(client: TestClient, rt: Runtime) -> Iterator[str]:
    """The same app over real HTTP, for the CLI (a separate client of the lots service)."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(client.app, host="127.0.0.1", port=CLI_PORT, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout_s=20)
    yield f"http://127.0.0.1:{CLI_PORT}"
    server.should_exit = True
    thread.join(timeout=10)


def test_backfill_replays_history_idempotently(
    new_district: Callable[[str], District], dsettings: Settings, served: str, tmp_path: Path
) -> None:
    d = new_district("csv")
    old = utcnow().replace(microsecond=0) - timedelta(days=40)  # older than live pushes may be
    records = [record(d, at=old + timedelta(minutes=i), lot=d.lots[i % 2]) for i in range(1200)]
    records[7]["plate"] = "苏E1234I"
    records[900]["lot"] = "NOWHERE-1"
    file = tmp_path / "history.csv"
    file.write_bytes(body_for(d, records) + b"WJ,broken\r\n")
    env = {
        **os.environ,
        "CITYPARK_DATABASE_URL": dsettings.database_url,
        "CITYPARK_REDIS_URL": dsettings.redis_url,
        "CITYPARK_KAFKA_BOOTSTRAP": dsettings.kafka_bootstrap,
        "CITYPARK_BUS": "kafka",
        "CITYPARK_CACHE": "redis",
        "CITYPARK_JWT_SECRET": dsettings.jwt_secret.get_secret_value(),
        "CITYPARK_LOTS_URL": served,
        "COLUMNS": "200",
    }

    def run(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", "districts", "import"]
            + ["--district", code, "--dialect", "csv", str(file)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    first = run(d.code)
    assert first.returncode == 0, first.stderr
    assert "1201 records: 1198 accepted, 0 duplicate, 3 rejected" in first.stderr
    assert "lot_unknown 1" in first.stderr
    assert "plate_invalid 1" in first.stderr
    again = run(d.code)
    assert again.returncode == 0, again.stderr
    assert "1201 records: 0 accepted, 1198 duplicate, 3 rejected" in again.stderr
    # Forget the gateway's memory of serials: the adapter's inbox still knows them.
    tests_rt = Runtime(dsettings, source="tests")
    stop, threads = run_adapter_threads(tests_rt, d.code)
    try:
        wait_for(lambda: inbox_count(tests_rt, d.code) == 1198)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
    r = redis.Redis.from_url(dsettings.redis_url)
    for key in r.scan_iter(f"citypark:gw:district:{d.code}:serial:*"):
        r.delete(key)
    third = run(d.code)
    assert "1201 records: 0 accepted, 1198 duplicate, 3 rejected" in third.stderr
    unknown = run("nowhere")
    assert unknown.returncode == 1
    assert "district_unknown" in unknown.stderr


# --- throughput ---------------------------------------------------------------------------------

BENCH_RECORDS = 3000
# `make bench` points this at its report folder and runs this test as its dialect phase.
BENCH_OUT = Path(
    os.environ.get("CITYPARK_BENCH_DISTRICTS_OUT", ROOT / ".local" / "bench" / "districts.json")
)


@pytest.mark.parametrize("dialect", ["canonical", "legacy-json", "xml", "csv"])
def test_throughput_per_dialect(
    client: TestClient, rt: Runtime, new_district: Callable[[str], District], dialect: str
) -> None:
    """Records per second through the gateway (parse, checks, durable publish) and through the
    adapter (first canonical event written to last relayed to Kafka, so the consumer group's
    join is not counted). Written to .local/bench/districts.json for the benchmark report."""
    d = new_district(dialect)
    bodies = [
        body_for(d, [record(d, lot=d.lots[i % 2]) for i in range(1000)])
        for _ in range(BENCH_RECORDS // 1000)
    ]
    started = time.perf_counter()
    for body in bodies:
        assert push(client, d, body).json()["accepted"] == 1000
    gateway_s = time.perf_counter() - started

    def span() -> tuple[int, Any, Any]:
        with rt.sessionmaker() as db:
            n, first, last = db.execute(
                select(func.count(), func.min(LogRow.created_at), func.max(LogRow.relayed_at))
                .where(LogRow.source == adapter.source_of(d.code))
                .where(LogRow.relayed_at.is_not(None))
            ).one()
            return int(n), first, last

    stop, threads = run_adapter_threads(rt, d.code)
    try:
        n, first, last = wait_for(lambda: (got := span())[0] == BENCH_RECORDS and got, 120)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
    adapter_s = max((last - first).total_seconds(), 1e-3)
    figures = {
        "gateway_records_per_s": round(BENCH_RECORDS / gateway_s),
        "adapter_records_per_s": round(n / adapter_s),
        "bytes_per_1000_records": len(bodies[0]),
    }
    BENCH_OUT.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(BENCH_OUT.read_text()) if BENCH_OUT.exists() else {}
    BENCH_OUT.write_text(json.dumps({**known, dialect: figures}, indent=1) + "\n")
    # Speed is reported by `make bench`, not asserted here; what must hold is that every
    # record went through.
    assert n == BENCH_RECORDS
