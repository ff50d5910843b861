"""No plate or phone in clear in Kafka, Redis or the logs, after a whole city's day on the real
bus and Redis (db 3) in one process: a driver signs in, binds an account, proves a vehicle,
parks through the connector (entry, exit on post-pay, the charge captured, the notification
sent), a district pushes a record of another car, an admin looks a plate up unmasked. Then every
`citypark.*` topic is read from the beginning, every key of the Redis db with its members and
values, and everything the process logged; none of the day's plates (as normalised and as sent)
or phones may appear. The scanner itself is proven on a planted plate first.

Plates and phones are random (letters too), so nothing other runs left on the shared broker can
match them."""

from __future__ import annotations

import random
import re
import secrets
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from citypark_connector import SignatureAuth, generate_keypair
from fastapi.testclient import TestClient
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

from loadtests.ownership import add_verified_vehicle
from services.gateway.gate import state as gate_state
from services.gateway.tokens import service as admin_tokens
from services.lots.schemas import EXAMPLE_TARIFF
from shared import pii
from shared.auth import Role
from shared.bus import kafka as kafka_bus
from shared.db import transaction
from shared.runtime import Runtime
from shared.settings import BusKind, CacheKind
from shared.topics import all_topics, ensure_topics
from tests.conftest import Infra, scratch_database
from tests.embedded_city import embedded_city, onboard_lot, wait_for

pytestmark = pytest.mark.integration
REDIS_DB = 3
SERIAL = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"  # no I or O: never issued


def new_plate() -> tuple[str, str]:
    """(normalised, as a car park sends it)."""
    rng = random.SystemRandom()
    letter = rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ")
    serial = "".join(rng.choice(SERIAL) for _ in range(5))
    return f"苏{letter}{serial}", f"苏{letter}·{serial}"


def new_phone() -> str:
    return "1" + random.SystemRandom().choice("3456789") + f"{secrets.randbelow(10**9):09d}"


@pytest.fixture
def isolated_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """This city's consumer groups of its own, starting at the topics' current ends: groups
    shared with other suites on this broker would hand our events to them, and a fresh group
    reading from the beginning would chew through every earlier run."""
    prefix = f"noplain-{uuid.uuid4().hex[:8]}-"
    original = kafka_bus.KafkaSubscription.__init__

    def init(self: Any, bootstrap: str, group: str, topics: Any, **kw: Any) -> None:
        group = prefix + group
        start = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","), group_id=group, enable_auto_commit=False
        )
        try:
            parts = [
                TopicPartition(t, p) for t in topics for p in start.partitions_for_topic(t) or ()
            ]
            if parts:
                start.assign(parts)
                start.seek_to_end()
                start.commit({tp: _offset(start.position(tp)) for tp in parts})
        finally:
            start.close()
        original(self, bootstrap, group, topics, **kw)

    monkeypatch.setattr(kafka_bus.KafkaSubscription, "__init__", init)


def _offset(position: int) -> Any:
    from kafka.structs import OffsetAndMetadata

    try:
        return OffsetAndMetadata(position, "", -1)
    except TypeError:  # older kafka-python: no leader epoch
        return OffsetAndMetadata(position, "")  # type: ignore[call-arg]


@pytest.fixture
def city(infra: Infra, isolated_groups: None) -> Iterator[TestClient]:
    redis_url = infra.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    redis.Redis.from_url(redis_url).flushdb()
    with (
        scratch_database(infra) as database_url,
        embedded_city(
            Path("unused"),
            database_url=database_url,
            bus=BusKind.kafka,
            kafka_bootstrap=infra.kafka_bootstrap,
            cache=CacheKind.redis,
            redis_url=redis_url,
        ) as client,
    ):
        yield client
    redis.Redis.from_url(redis_url).flushdb()


# -- the scanner ---------------------------------------------------------------------------


def kafka_texts(bootstrap: str, topics: list[str]) -> Iterator[tuple[str, str]]:
    """(topic, key + value + headers as text) of every message now on these topics."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), enable_auto_commit=False)
    try:
        parts = [
            TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()
        ]
        ends = consumer.end_offsets(parts)
        left = {tp for tp in parts if ends[tp] > 0}
        consumer.assign(list(left))
        consumer.seek_to_beginning()
        left = {tp for tp in left if consumer.position(tp) < ends[tp]}
        while left:
            for tp, messages in consumer.poll(timeout_ms=1000, max_records=5000).items():
                for m in messages:
                    headers = " ".join(f"{k}={v!r}" for k, v in m.headers or [])
                    yield tp.topic, _text(m.key) + "\n" + _text(m.value) + "\n" + headers
                if consumer.position(tp) >= ends[tp]:
                    left.discard(tp)
    finally:
        consumer.close()


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", errors="replace")


def citypark_topics(bootstrap: str) -> list[str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        listed = {t for t in admin.list_topics() if t.startswith("citypark.")}
    finally:
        admin.close()
    return sorted(listed | (set(all_topics()) & listed))


def redis_texts(r: redis.Redis) -> Iterator[tuple[str, str]]:
    """(key, key + members + values as text) of every key of the db."""
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        parts = [str(key)]
        if kind == "string":
            parts.append(str(r.get(key)))
        elif kind == "set":
            parts += map(str, r.smembers(key))
        elif kind == "hash":
            for field, value in r.hgetall(key).items():
                parts += [str(field), str(value)]
        elif kind == "list":
            parts += map(str, r.lrange(key, 0, -1))
        elif kind == "zset":
            parts += [str(m) for m, _ in r.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            parts += [repr(e) for e in r.xrange(key)]
        yield str(key), "\n".join(parts)


def found(needles: list[str], texts: Iterator[tuple[str, str]]) -> list[tuple[str, str]]:
    """(where, needle) for each needle in each text, in order, once."""
    pattern = re.compile("|".join(map(re.escape, needles)))
    return [
        (where, needle) for where, text in texts for needle in dict.fromkeys(pattern.findall(text))
    ]


# -- the day --------------------------------------------------------------------------------


def sign_in(client: TestClient, admin: dict[str, str], phone: str) -> dict[str, str]:
    assert client.post("/v1/auth/otp", json={"phone": phone}).status_code < 300
    sms = client.get("/v1/admin/sandbox/sms", params={"phone": phone}, headers=admin).json()
    code = re.search(r"\d{6}", sms[0]["body"]).group(0)  # type: ignore[union-attr]
    token = client.post("/v1/auth/token", json={"phone": phone, "code": code}).json()
    me = {"Authorization": f"Bearer {token['access_token']}"}
    agreement_no = client.post(
        "/sandbox/pay/v1/agreements", json={"holder": "h", "balance_fen": 100_000}
    ).json()["agreement_no"]
    bound = client.put(
        "/v1/me/account", headers=me, json={"provider": "sandbox", "agreement_no": agreement_no}
    )
    assert bound.status_code == 200, bound.text
    return me


def new_district(client: TestClient, admin: dict[str, str], operator_id: str) -> tuple[str, Any]:
    code = f"np{uuid.uuid4().hex[:8]}"
    private_pem, public_pem = generate_keypair()
    made = client.post(
        "/v1/admin/districts",
        headers=admin,
        json={
            "code": code,
            "name": f"区 {code}",
            "dialect": "canonical",
            "public_keys": [{"key_id": f"{code}-platform", "public_key_pem": public_pem}],
        },
    )
    assert made.status_code == 201, made.text
    lot = client.post(
        "/v1/admin/lots",
        headers=admin,
        json={
            "code": f"{code.upper()}-0",
            "name": "district lot",
            "district": code,
            "operator_id": operator_id,
            "capacity": 10,
            "location": {"lat": 31.3, "lng": 120.6},
            "tariff": EXAMPLE_TARIFF,
        },
    )
    assert lot.status_code == 201, lot.text
    return code, SignatureAuth(f"{code}-platform", private_pem)


def test_no_plate_or_phone_in_clear_in_kafka_redis_or_logs(
    city: TestClient, infra: Infra, capfd: pytest.CaptureFixture[str]
) -> None:
    client = city
    rt: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    bootstrap = infra.kafka_bootstrap
    r = redis.Redis.from_url(rt.settings.redis_url, decode_responses=True)
    with transaction(rt.sessionmaker) as db:
        admin = {"Authorization": f"Bearer {admin_tokens.create(db, rt.secret, Role.admin)}"}

    # The scanner finds what is there: a planted plate in Redis, on a scratch topic, in the log.
    planted, _ = new_plate()
    scratch = f"citypark.scratch-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [scratch], partitions=1)
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","))
    producer.send(scratch, key=b"k", value=f'{{"plate": "{planted}"}}'.encode()).get(timeout=20)
    producer.close()
    r.set(f"scratch:{planted}", 1)
    print(f"scratch {planted}", file=sys.stderr)  # noqa: T201
    try:
        assert found([planted], kafka_texts(bootstrap, [scratch])) == [(scratch, planted)]
        assert scratch in citypark_topics(bootstrap)
        assert found([planted], redis_texts(r)) == [(f"scratch:{planted}", planted)]
        assert planted in capfd.readouterr().err
    finally:
        r.delete(f"scratch:{planted}")
        admin_client = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
        admin_client.delete_topics([scratch])
        admin_client.close()

    # The day.
    plate, plate_sent = new_plate()
    other, other_sent = new_plate()
    phone = new_phone()
    me = sign_in(client, admin, phone)
    add_verified_vehicle(client, me, plate_sent)
    wait_for(lambda: gate_state.driver_of(r, rt.settings, plate, "blue"))

    code = f"NP-{uuid.uuid4().hex[:4].upper()}"
    lot, private_pem = onboard_lot(client, admin, code=code, district="gusu", tariff=EXAMPLE_TARIFF)
    gate = httpx.Client(
        base_url="http://testserver",
        transport=client._transport,
        auth=SignatureAuth(code.lower(), private_pem),
    )
    now = datetime.now(UTC).replace(microsecond=0)
    entry = {
        "event_id": str(uuid.uuid4()),
        "plate": plate_sent,
        "plate_color": "blue",
        "vehicle_type": "small",
        "occurred_at": (now - timedelta(hours=2)).isoformat(),
    }
    assert gate.post("/v1/connector/entries", json=entry).status_code == 202
    exit_ = {
        "event_id": str(uuid.uuid4()),
        "plate": plate_sent,
        "plate_color": "blue",
        "occurred_at": now.isoformat(),
    }
    left = gate.post("/v1/connector/exits", json=exit_)
    assert left.status_code == 200, left.text
    assert left.json()["decision"] == "postpay"
    wait_for(
        lambda: [
            c for c in client.get("/v1/me/charges", headers=me).json() if c["status"] == "captured"
        ],
        timeout_s=40,
    )
    wait_for(lambda: client.get("/v1/me/notifications", headers=me).json())

    district, district_auth = new_district(client, admin, lot["operator_id"])
    pushed = client.post(
        f"/v1/districts/{district}/events",
        json={
            "events": [
                {
                    "kind": "entry",
                    "event_id": str(uuid.uuid4()),
                    "lot": f"{district.upper()}-0",
                    "plate": other_sent,
                    "plate_color": "blue",
                    "occurred_at": (now - timedelta(minutes=5)).isoformat(),
                }
            ]
        },
        auth=district_auth,
    )
    assert pushed.status_code < 300, pushed.text

    reason = "dispute about a charge"
    looked = client.get(
        "/v1/admin/sessions",
        params={"plate": plate, "unmasked": "true", "reason": reason},
        headers=admin,
    )
    assert looked.status_code == 200, looked.text
    assert [s["plate"] for s in looked.json()] == [plate]
    # Through the audit topic into the log: the look-up has been on Kafka.
    wait_for(
        lambda: client.get(
            "/v1/admin/audit", params={"service": "sessions", "entity": "session"}, headers=admin
        ).json()["items"]
    )
    gate.close()

    # Everything, everywhere.
    needles = [plate, plate_sent, other, other_sent, phone]
    # The vehicle's pseudonym is searched too: the day's traffic was there to be scanned.
    vref = pii.plate_ref(rt.settings, plate, "blue")
    on_kafka = found([*needles, vref], kafka_texts(bootstrap, citypark_topics(bootstrap)))
    assert [hit for hit in on_kafka if hit[1] != vref] == []
    assert {where for where, hit in on_kafka if hit == vref} >= {
        "citypark.lot-events.gusu",
        "citypark.parking-events",
    }
    in_redis = found([*needles, vref], redis_texts(r))
    assert [hit for hit in in_redis if hit[1] != vref] == []
    assert f"{gate_state.P}vehicle:{vref}" in {where for where, _ in in_redis}
    logged = capfd.readouterr()
    assert found(needles, iter([("stdout", logged.out), ("stderr", logged.err)])) == []
