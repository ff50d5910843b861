"""Integration fixtures: a migrated PostgreSQL database of this session, real Redis and Kafka."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
import uvicorn
from kafka.admin import KafkaAdminClient, NewTopic
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from services import city
from shared.http import make_app
from shared.runtime import Runtime, attach
from shared.settings import BusKind, CacheKind, Settings
from tests.conftest import Infra

pytestmark = pytest.mark.integration

REDIS_TEST_DB = 6
SANDBOX_PORT = 18190


@pytest.fixture(scope="session")
def settings(infra: Infra, fresh_database: str) -> Settings:
    s = Settings(
        database_url=fresh_database,
        redis_url=infra.redis_url.rsplit("/", 1)[0] + f"/{REDIS_TEST_DB}",
        kafka_bootstrap=infra.kafka_bootstrap,
        bus=BusKind.kafka,
        cache=CacheKind.redis,
        jwt_secret=SecretStr("integration-secret-long-enough-for-hs256"),
        paysandbox_url=f"http://127.0.0.1:{SANDBOX_PORT}",
        # These suites use the sandboxes as the provider and the SMS gateway, as `make run` does.
        sandbox_mode=True,
    )
    city.migrate(s)
    return s


@pytest.fixture(scope="session")
def runtime(settings: Settings) -> Runtime:
    return Runtime(settings, source="tests")


@pytest.fixture(scope="session")
def factory(runtime: Runtime) -> sessionmaker[Session]:
    return runtime.sessionmaker


@pytest.fixture
def real_redis(settings: Settings) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    r.flushdb()
    yield r
    r.flushdb()


@pytest.fixture
def topic(infra: Infra) -> Iterator[str]:
    """A fresh topic of this test (the broker does not auto-create topics)."""
    name = f"citypark.test.{uuid.uuid4().hex[:10]}"
    admin = KafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap, client_id="tests")
    admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1)])
    yield name
    admin.delete_topics([name])
    admin.close()


@pytest.fixture(scope="session")
def sandbox_url(settings: Settings) -> Iterator[str]:
    """The payment sandbox served over real HTTP from a thread, on the test database."""
    app = make_app("sandbox", "")
    attach(app, Runtime(settings, source="paysandbox"))
    for router in city.PARTS["paysandbox"].routers:
        app.include_router(router)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=SANDBOX_PORT, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "sandbox did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{SANDBOX_PORT}"
    server.should_exit = True
    thread.join(timeout=10)
