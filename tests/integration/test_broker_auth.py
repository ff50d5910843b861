"""The production profile's brokers refuse strangers and serve the city's own clients.

Starts its own Redis with the ACL of deploy/redis/citypark.acl and its own single-node KRaft
Kafka with the SASL/SCRAM-SHA-512 listener of deploy/kafka/server-sasl.properties, on free
loopback ports in a temporary directory (never the shared servers), and shows: without
credentials (or with wrong ones) the cache and the bus are refused; with them the city's own
cache (shared/cache.py) and bus (shared/bus/factory.py → shared/bus/kafka.py) work, and so does
the topics Job (deploy/local/create_topics.py)."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError
from pydantic import BaseModel, SecretStr, ValidationError
from sqlalchemy.orm import sessionmaker

from shared.bus.factory import make_bus, make_subscription
from shared.bus.kafka import client_config
from shared.bus.port import Message
from shared.cache import count_in_window, make_redis
from shared.events import EventType, new_event
from shared.settings import BusKind, CacheKind, KafkaAuth, KafkaSecurityProtocol, Settings
from shared.topics import ensure_topics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KAFKA_LIBS = Path(os.environ.get("CITYPARK_KAFKA_LIBS", ROOT / ".local" / "kafka" / "libs"))
START_TIMEOUT_S = 45.0  # the whole module stays well under a minute


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _need(ok: bool, what: str) -> None:
    # CI has them (`make test` starts deploy/local/infra.sh first); a bare checkout may not.
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"missing on CI: {what}")
        pytest.skip(f"missing: {what} (run deploy/local/infra.sh up once)")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- Redis


@dataclass(frozen=True)
class SecureRedis:
    port: int
    password: str

    def url(self, userinfo: str = "") -> str:
        return f"redis://{userinfo}127.0.0.1:{self.port}/0"


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    _need(shutil.which("redis-server") is not None, "redis-server")
    tmp = tmp_path_factory.mktemp("redis")
    password = secrets.token_hex(32)  # what the docs tell operators to generate
    acl = (DEPLOY / "redis" / "citypark.acl").read_text().replace("@PASSWORD@", password)
    (tmp / "users.acl").write_text(acl)
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp)]
        + ["--save", "", "--appendonly", "no", "--aclfile", str(tmp / "users.acl")],
        stdout=(tmp / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _port_open(port):
            assert proc.poll() is None, (tmp / "redis.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
        yield SecureRedis(port, password)
    finally:
        _stop(proc)


def _settings(**kw: object) -> Settings:
    return Settings(jwt_secret=SecretStr("broker-auth-secret-long-enough-for-hs256"), **kw)  # type: ignore[arg-type]


def test_redis_refuses_a_client_without_the_password(secure_redis: SecureRedis) -> None:
    anonymous = make_redis(_settings(cache=CacheKind.redis, redis_url=secure_redis.url()))
    with pytest.raises(redis.AuthenticationError):  # NOAUTH: the default user is off
        anonymous.set("citypark:probe", "1")
    wrong = redis.Redis.from_url(secure_redis.url("citypark:not-the-password@"))
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()
    default = redis.Redis.from_url(secure_redis.url(f"default:{secure_redis.password}@"))
    with pytest.raises(redis.AuthenticationError):
        default.ping()


def test_the_city_cache_works_with_its_credentials(secure_redis: SecureRedis) -> None:
    url = secure_redis.url(f"citypark:{secure_redis.password}@")
    r = make_redis(_settings(cache=CacheKind.redis, redis_url=url))
    r.set("citypark:probe", "ok", ex=30)
    assert r.get("citypark:probe") == "ok"
    assert count_in_window(r, "citypark:rl:probe", 60)[0] == 1  # MULTI/EXEC pipelines pass
    assert count_in_window(r, "citypark:rl:probe", 60)[0] == 2
    # Administrative and key-listing commands are not the city's to run.
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.flushall()
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.keys("*")


# ---------------------------------------------------------------- Kafka


@dataclass(frozen=True)
class SecureKafka:
    bootstrap: str
    password: str  # the `citypark` user's

    def auth(self, password: str | None = None) -> Settings:
        return _settings(
            bus=BusKind.kafka,
            kafka_bootstrap=self.bootstrap,
            kafka_security_protocol=KafkaSecurityProtocol.sasl_plaintext,
            kafka_sasl_username="citypark",
            kafka_sasl_password=SecretStr(password or self.password),
        )


def _kafka_answers(bootstrap: str, config: dict[str, object]) -> bool:
    try:
        admin = KafkaAdminClient(
            **config,
            bootstrap_servers=bootstrap,
            client_id="tests-broker-auth",
            request_timeout_ms=3000,
            bootstrap_timeout_ms=3000,
        )
    except KafkaError:
        return False
    try:
        admin.describe_cluster()
        return True
    except KafkaError:
        return False
    finally:
        admin.close()


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    _need(shutil.which("java") is not None, "java")
    _need((KAFKA_LIBS / ".pom.sha256").is_file(), f"the Kafka jars in {KAFKA_LIBS}")
    tmp = tmp_path_factory.mktemp("kafka")
    port, controller = _free_port(), _free_port()
    broker_pw, city_pw = secrets.token_hex(32), secrets.token_hex(32)
    # deploy/kafka/start.sh itself, as compose runs it, with the image's two launchers replaced
    # by the same classes run from the jars infra.sh fetched (each `exec`s: one process to stop)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    java = f'exec java -cp "{KAFKA_LIBS}/*"'
    launchers = {
        "kafka-storage.sh": f'{java} -Xmx256m kafka.tools.StorageTool "$@"',
        "kafka-server-start.sh": f"{java} -Xms128m -Xmx384m -XX:+UseSerialGC "
        f"-Dlog4j2.configurationFile={DEPLOY / 'local' / 'kafka' / 'log4j2.properties'} "
        f'-Dkafka.logs.dir={tmp} kafka.Kafka "$@"',
    }
    for name, line in launchers.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{line}\n")
        (bin_dir / name).chmod(0o755)
    env = os.environ | {
        "CLUSTER_ID": base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="),
        "CITYPARK_KAFKA_BROKER_PASSWORD": broker_pw,
        "CITYPARK_KAFKA_PASSWORD": city_pw,
        "KAFKA_BIN": str(bin_dir),
        "KAFKA_LOG_DIRS": str(tmp / "data"),
        "KAFKA_LISTEN_HOST": "127.0.0.1",
        "KAFKA_ADVERTISED_HOST": "127.0.0.1",
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(controller),
        "CITYPARK_KAFKA_RUN_DIR": str(tmp / "run"),
    }
    log = (tmp / "stdout.log").open("wb")
    proc = subprocess.Popen(
        ["sh", str(DEPLOY / "kafka" / "start.sh")], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    kafka = SecureKafka(f"127.0.0.1:{port}", city_pw)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        ok = client_config(kafka.auth())
        while not (_port_open(port) and _kafka_answers(kafka.bootstrap, ok)):
            assert proc.poll() is None, (tmp / "stdout.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "kafka did not answer in time"
            time.sleep(0.2)
        yield kafka
    finally:
        _stop(proc)
        log.close()


def test_kafka_refuses_clients_without_valid_credentials(secure_kafka: SecureKafka) -> None:
    assert not _kafka_answers(secure_kafka.bootstrap, {})  # PLAINTEXT on the SASL listener
    assert not _kafka_answers(
        secure_kafka.bootstrap, client_config(secure_kafka.auth(password="not-the-password"))
    )
    # ...while the broker is up and answers the city's own user at the same moment
    assert _kafka_answers(secure_kafka.bootstrap, client_config(secure_kafka.auth()))


def test_the_city_bus_publishes_and_consumes_with_its_credentials(
    secure_kafka: SecureKafka,
) -> None:
    settings = secure_kafka.auth()
    topic = f"citypark.test.auth.{uuid.uuid4().hex[:8]}"
    assert ensure_topics(settings.kafka_bootstrap, [topic], partitions=1, auth=settings) == [topic]

    class Probe(BaseModel):
        n: int

    no_db: sessionmaker = sessionmaker()  # the Kafka bus needs no database
    bus = make_bus(settings, no_db, "tests")
    sub = make_subscription(settings, no_db, f"g-{uuid.uuid4().hex[:6]}", [topic])
    try:
        bus.publish(
            topic, "lot-1", new_event(EventType.parking_entry, source="tests", data=Probe(n=7))
        )
        got: list[Message] = []
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            got = sub.poll(0.5)
        assert [(m.key, m.event.data["n"]) for m in got] == [("lot-1", 7)]
        sub.commit(got)  # the group coordinator accepts the authenticated member's offsets
    finally:
        sub.close()
        bus.close()


def test_the_topics_job_authenticates_from_the_environment(secure_kafka: SecureKafka) -> None:
    script = str(DEPLOY / "local" / "create_topics.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYPARK_KAFKA_")}
    env["CITYPARK_KAFKA_BOOTSTRAP"] = secure_kafka.bootstrap

    def probe(extra: dict[str, str]) -> int:
        return subprocess.run(
            [sys.executable, script, "--probe"], env=env | extra, capture_output=True, timeout=30
        ).returncode

    assert probe({}) == 1
    assert (
        probe(
            {
                "CITYPARK_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "CITYPARK_KAFKA_SASL_USERNAME": "citypark",
                "CITYPARK_KAFKA_SASL_PASSWORD": secure_kafka.password,
            }
        )
        == 0
    )


# ---------------------------------------------------------------- settings (no servers)


def test_loopback_stays_plaintext_and_sasl_needs_both_credentials() -> None:
    assert client_config(KafkaAuth()) == {}  # make test / make run / infra.sh: unchanged
    with pytest.raises(ValidationError, match="SASL_USERNAME and CITYPARK_KAFKA_SASL_PASSWORD"):
        KafkaAuth(kafka_security_protocol=KafkaSecurityProtocol.sasl_ssl, kafka_sasl_username="u")
    auth = KafkaAuth(
        kafka_security_protocol=KafkaSecurityProtocol.sasl_ssl,
        kafka_sasl_username="citypark",
        kafka_sasl_password=SecretStr("s3cret-value"),
    )
    assert client_config(auth) == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "citypark",
        "sasl_plain_password": "s3cret-value",
    }
    assert "s3cret-value" not in repr(auth)  # a logged settings object shows no password
