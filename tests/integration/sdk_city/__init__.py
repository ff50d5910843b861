"""A real gateway (with the lots service) served over HTTP from a thread, for connector tests.

Own ports (18100–18199), own Redis DB (8), own district and Kafka topic per test module, so
it runs next to every other suite on the same infrastructure.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from citypark_connector import generate_keypair
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError
from pydantic import SecretStr

from services import city
from services.gateway.main import part as gateway
from services.lots.main import part as lots_part
from services.lots.schemas import EXAMPLE_TARIFF
from shared.auth import Role, issue_admin_token
from shared.runtime import Runtime
from shared.settings import BusKind, CacheKind, Settings
from shared.topics import lot_events

REDIS_DB = 8
PORTS = range(18100, 18200)


def connector_settings(database_url: str, redis_url: str, kafka: str, port: int) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}",
        kafka_bootstrap=kafka,
        bus=BusKind.kafka,
        cache=CacheKind.redis,
        jwt_secret=SecretStr("connector-tests-secret-long-enough-for-hs256"),
        lots_url=f"http://127.0.0.1:{port}",
    )


class Gateway:
    """The gateway and lots routers in one uvicorn server that can be stopped and restarted."""

    def __init__(self, rt: Runtime, port: int) -> None:
        self.rt = rt
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.app = city.build_app(rt, [gateway, lots_part], workers=[])
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True, name=f"gateway-{self.port}")
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "gateway did not start"
            assert thread.is_alive(), "gateway thread died (port taken?)"
            time.sleep(0.02)
        self._server, self._thread = server, thread

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=15)
        self._server = self._thread = None


@dataclass(frozen=True)
class LotKey:
    key_id: str
    private_pem: str
    public_pem: str


def new_key(prefix: str = "k") -> LotKey:
    private_pem, public_pem = generate_keypair()
    return LotKey(f"{prefix}-{uuid.uuid4().hex[:12]}", private_pem, public_pem)


@dataclass(frozen=True)
class Lot:
    lot_id: str
    code: str
    district: str
    key: LotKey
    key_ids: tuple[str, ...]


def admin_headers(rt: Runtime) -> dict[str, str]:
    token, _ = issue_admin_token(rt.secret, Role.admin)
    return {"authorization": f"Bearer {token}"}


def admin_call(gw: Gateway, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """City ops through the admin API (SPEC §7), as they would onboard a car park."""
    response = httpx.request(
        method, gw.url + path, json=body, headers=admin_headers(gw.rt), timeout=30
    )
    assert response.is_success, response.text
    return response.json() if response.content else None


def new_district(gw: Gateway) -> str:
    """A district of this test alone, with its own topic on the broker."""
    code = f"t-{secrets.token_hex(4)}"
    admin_call(
        gw, "POST", "/v1/admin/districts", {"code": code, "name": code, "dialect": "canonical"}
    )
    admin = KafkaAdminClient(bootstrap_servers=gw.rt.settings.kafka_bootstrap, client_id="sdk")
    try:
        admin.create_topics([NewTopic(lot_events(code), num_partitions=2, replication_factor=1)])
    except TopicAlreadyExistsError:
        pass  # creating the district made it already
    finally:
        admin.close()
    return code


def drop_district_topic(rt: Runtime, district: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=rt.settings.kafka_bootstrap, client_id="sdk")
    try:
        admin.delete_topics([lot_events(district)])
    finally:
        admin.close()


def new_lot(gw: Gateway, district: str, *, postpay: bool = True, keys: int = 1) -> Lot:
    made = [new_key() for _ in range(keys)]
    code = f"T-{secrets.token_hex(4).upper()}"
    operator = admin_call(
        gw,
        "POST",
        "/v1/admin/operators",
        {"name": "test operator", "commission_bps": 500, "settlement_account": "6222"},
    )
    lot = admin_call(
        gw,
        "POST",
        "/v1/admin/lots",
        {
            "code": code,
            "name": code,
            "district": district,
            "operator_id": operator["id"],
            "capacity": 100,
            "location": {"lat": 31.3, "lng": 120.6},
            "postpay_enabled": postpay,
            "public_keys": [{"key_id": k.key_id, "public_key_pem": k.public_pem} for k in made],
            "tariff": EXAMPLE_TARIFF,
        },
    )
    return Lot(str(lot["id"]), code, district, made[0], tuple(k.key_id for k in made))


def events_on_topic(bootstrap: str, topic: str, idle_s: float = 3.0) -> Counter[str]:
    """How many times each connector event id sits on the topic (read from the beginning)."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap.split(","),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=int(idle_s * 1000),
    )
    counts: Counter[str] = Counter()
    try:
        for record in consumer:
            envelope = json.loads(record.value)
            counts[str(envelope["data"]["event_id"])] += 1
    finally:
        consumer.close()
    return counts
