"""Admin tokens expire, and once revoked (API or CLI) every service answers them 401
`token_revoked` within 10 s: in the embedded city (one process) and in the real topology, where
lots, sessions and billing are apps of their own, on a database of their own, and learn about
revocations from the gateway over HTTP. Issuing and revoking are audited; the payment sandbox
refuses callers without billing's token outside sandbox mode."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from fastapi.testclient import TestClient
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError
from pydantic import SecretStr
from sqlalchemy import select
from typer.testing import CliRunner

from services import city
from services.billing.provider.sandbox import SandboxProvider
from services.cli import app as cli
from services.gateway.tokens import service as tokens
from services.paysandbox.auth import sandbox_token
from shared.auth import ISSUER, Role
from shared.bus.models import LogRow
from shared.bus.outbox import relay_once
from shared.http import make_app
from shared.keys import Purpose, derive
from shared.runtime import Runtime, attach
from shared.settings import BusKind, CacheKind, Settings, get_settings
from shared.topics import AUDIT_EVENTS
from tests.conftest import Infra, scratch_database
from tests.embedded_city import embedded_city

REDIS_DB = 11
GATEWAY_PORT = 18801  # this suite's ports: 18800-18899
SANDBOX_PORT = 18802
SECRET = "admin-tokens-tests-secret-0123456789abcdef"
REVOKED_WITHIN_S = 10.0
# An admin route of each service: (service, path).
ADMIN_ROUTES = [
    ("gateway", "/v1/admin/tokens"),
    ("lots", "/v1/admin/districts"),
    ("sessions", "/v1/admin/sessions"),
    ("billing", "/v1/admin/arrears"),
]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def outcome(answer: httpx.Response) -> tuple[int, str | None]:
    body = answer.json()
    return answer.status_code, body.get("code") if isinstance(body, dict) else None


def until(check: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until `check` holds; fails past `timeout_s`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic() - start


@contextmanager
def cli_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Iterator[CliRunner]:
    """The `citypark` command on the given database, in this process."""
    monkeypatch.setenv("CITYPARK_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("CITYPARK_JWT_SECRET", settings.jwt_secret.get_secret_value())
    monkeypatch.setenv("CITYPARK_BUS", settings.bus.value)
    # In-process, the command must not point the city's loggers at the runner's stream.
    monkeypatch.setattr("services.cli.configure_logging", lambda *a, **k: None)
    get_settings.cache_clear()
    try:
        yield CliRunner()
    finally:
        get_settings.cache_clear()


def cli_token(runner: CliRunner, *args: str) -> str:
    issued = runner.invoke(cli, ["admin", "token", *args])
    assert issued.exit_code == 0, issued.output
    return issued.stdout.strip().splitlines()[-1]


def jti_of(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


# --- the embedded city: one process, one database ---------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with embedded_city(tmp_path_factory.mktemp("admin-tokens") / "city.db") as tc:
        yield tc


def embedded_issue(client: TestClient, role: Role = Role.admin, **kw: Any) -> tuple[str, str]:
    rt: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    with rt.sessionmaker() as db, db.begin():
        issued = tokens.issue(db, rt.secret, role, **kw)
    return issued.token, issued.jti


def everywhere(client: TestClient, token: str) -> dict[str, tuple[int, str | None]]:
    return {svc: outcome(client.get(path, headers=bearer(token))) for svc, path in ADMIN_ROUTES}


def test_revoked_through_the_api_at_once_in_the_embedded_city(embedded: TestClient) -> None:
    ops, _ = embedded_issue(embedded, name="ops on duty")
    token, jti = embedded_issue(embedded, name="a contractor", note="audit 2026", ttl_s=3600)
    assert everywhere(embedded, token) == {svc: (200, None) for svc, _ in ADMIN_ROUTES}

    listed = embedded.get("/v1/admin/tokens", headers=bearer(ops))
    [mine] = [t for t in listed.json() if t["jti"] == jti]
    assert mine["name"] == "a contractor"
    assert mine["note"] == "audit 2026"
    assert (mine["role"], mine["active"], mine["revoked_at"]) == ("admin", True, None)
    expires_at = datetime.fromisoformat(mine["expires_at"])
    assert expires_at.utcoffset() == timedelta(0)  # UTC, with its offset
    assert timedelta(minutes=59) < expires_at - datetime.now(UTC) <= timedelta(hours=1)
    assert token not in listed.text
    assert "token_hash" not in listed.text

    revoked = embedded.delete(f"/v1/admin/tokens/{jti}", headers=bearer(ops))
    assert revoked.status_code == 204, revoked.text
    # The one process refuses it at once, at every service's admin routes.
    assert everywhere(embedded, token) == {svc: (401, "token_revoked") for svc, _ in ADMIN_ROUTES}
    assert everywhere(embedded, ops) == {svc: (200, None) for svc, _ in ADMIN_ROUTES}
    again = embedded.delete(f"/v1/admin/tokens/{jti}", headers=bearer(ops))
    assert again.status_code == 204  # revoking twice changes nothing
    [mine] = [
        t for t in embedded.get("/v1/admin/tokens", headers=bearer(ops)).json() if t["jti"] == jti
    ]
    assert mine["active"] is False
    assert mine["revoked_at"] is not None

    unknown = embedded.delete("/v1/admin/tokens/no-such-token", headers=bearer(ops))
    assert outcome(unknown) == (404, "token_unknown")
    viewer, _ = embedded_issue(embedded, Role.viewer)
    assert outcome(embedded.delete(f"/v1/admin/tokens/{jti}", headers=bearer(viewer))) == (
        403,
        "forbidden",
    )

    # Both writes are in the city's one audit log, by the gateway, with who did them.
    def audited() -> list[dict[str, Any]]:
        page = embedded.get(
            "/v1/admin/audit", params={"service": "gateway", "entity_id": jti}, headers=bearer(ops)
        )
        items: list[dict[str, Any]] = page.json()["items"] if page.status_code == 200 else []
        return items if len(items) >= 2 else []

    entries = {e["action"]: e for e in until_value(audited)}
    assert set(entries) == {"issue", "revoke"}
    assert entries["revoke"]["actor"] == jti_of(ops)
    assert entries["revoke"]["entity"] == "admin_token"
    assert entries["revoke"]["after"]["revoked_at"] is not None
    assert entries["issue"]["after"]["name"] == "a contractor"


def until_value(check: Callable[[], list[dict[str, Any]]], timeout_s: float = 30) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if found := check():
            return found
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def test_revoked_through_the_cli_within_seconds_in_the_embedded_city(
    embedded: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt: Runtime = embedded.app.state.runtime  # type: ignore[attr-defined]
    with cli_env(monkeypatch, rt.settings) as runner:
        token = cli_token(runner, "--role", "viewer", "--ttl", "30m", "--name", "night shift")
        assert everywhere(embedded, token) == {
            "gateway": (403, "forbidden"),  # listing tokens is for admins; the token is good
            "lots": (200, None),
            "sessions": (200, None),
            "billing": (200, None),
        }
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 1800
        revoked = runner.invoke(cli, ["admin", "revoke", jti_of(token), "--reason", "left"])
        assert revoked.exit_code == 0, revoked.output
        unknown = runner.invoke(cli, ["admin", "revoke", "no-such-token"])
        assert unknown.exit_code == 1
        assert "token_unknown" in unknown.output
        bad_ttl = runner.invoke(cli, ["admin", "token", "--ttl", "forever"])
        assert bad_ttl.exit_code == 2
    # Another process wrote the revocation: the city's list catches up within its max age.
    took = until(
        lambda: set(everywhere(embedded, token).values()) == {(401, "token_revoked")},
        REVOKED_WITHIN_S,
    )
    assert took < REVOKED_WITHIN_S


def test_tokens_expire_and_tokens_without_an_expiry_are_refused(embedded: TestClient) -> None:
    token, _ = embedded_issue(embedded, ttl_s=1)
    time.sleep(2.1)
    assert everywhere(embedded, token) == {svc: (401, "token_expired") for svc, _ in ADMIN_ROUTES}
    # As admin tokens were issued before they expired: no `exp`, trusted forever. Not now.
    rt: Runtime = embedded.app.state.runtime  # type: ignore[attr-defined]
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "admin:old", "kind": "admin", "role": "admin", "jti": "old"}
    legacy = jwt.encode({**claims, "iat": now}, derive(rt.secret, Purpose.admin_tokens), "HS256")
    assert everywhere(embedded, legacy) == {svc: (401, "token_expired") for svc, _ in ADMIN_ROUTES}


# --- the real topology: the gateway and each service an app of its own -------------------------


@dataclass
class Topology:
    gateway: str
    gateway_rt: Runtime
    services: dict[str, TestClient]
    stop_gateway: Callable[[], None]

    def at(self, token: str) -> dict[str, tuple[int, str | None]]:
        out = {
            "gateway": outcome(httpx.get(self.gateway + ADMIN_ROUTES[0][1], headers=bearer(token)))
        }
        for svc, path in ADMIN_ROUTES[1:]:
            out[svc] = outcome(self.services[svc].get(path, headers=bearer(token)))
        return out

    def issue(self, role: Role = Role.admin) -> tuple[str, str]:
        with self.gateway_rt.sessionmaker() as db, db.begin():
            issued = tokens.issue(db, self.gateway_rt.secret, role, name="tests")
        return issued.token, issued.jti


def serve(app: Any, port: int) -> Callable[[], None]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name=f"server-{port}")
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, f"no server on {port}"
        assert thread.is_alive(), f"the server on {port} died (port taken?)"
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=15)

    return stop


def real_settings(infra: Infra, database_url: str, **extra: Any) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=infra.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}",
        kafka_bootstrap=infra.kafka_bootstrap,
        bus=BusKind.kafka,
        cache=CacheKind.redis,
        jwt_secret=SecretStr(SECRET),
        gateway_url=f"http://127.0.0.1:{GATEWAY_PORT}",
        **extra,
    )


@pytest.fixture(scope="module")
def topology(infra: Infra) -> Iterator[Topology]:
    with scratch_database(infra) as gateway_db, scratch_database(infra) as services_db:
        gateway_settings = real_settings(infra, gateway_db)
        services_settings = real_settings(infra, services_db)
        city.migrate(gateway_settings, [city.PARTS["gateway"]])
        parts = [city.PARTS[name] for name in ("lots", "sessions", "billing")]
        city.migrate(services_settings, parts)
        gateway_rt = Runtime(gateway_settings, source="gateway")
        stop = serve(city.build_app(gateway_rt, [city.PARTS["gateway"]], workers=[]), GATEWAY_PORT)
        clients = {
            part.name: TestClient(
                city.build_app(Runtime(services_settings, source=part.name), [part], workers=[])
            )
            for part in parts
        }
        try:
            yield Topology(f"http://127.0.0.1:{GATEWAY_PORT}", gateway_rt, clients, stop)
        finally:
            for client in clients.values():
                client.close()
            stop()
            gateway_rt.engine.dispose()


def audit_events(infra: Infra, jti: str, publish: Callable[[], None]) -> list[dict[str, Any]]:
    """The audit events about `jti` that reach the broker once `publish` runs."""
    admin = KafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap, client_id="tests")
    try:
        admin.create_topics([NewTopic(AUDIT_EVENTS, num_partitions=3, replication_factor=1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()
    consumer = KafkaConsumer(bootstrap_servers=infra.kafka_bootstrap, enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(AUDIT_EVENTS, p)
            for p in consumer.partitions_for_topic(AUDIT_EVENTS) or ()
        ]
        consumer.assign(partitions)
        consumer.seek_to_end()
        for tp in partitions:
            consumer.position(tp)  # pin the end now, before anything is published
        publish()
        found: list[dict[str, Any]] = []
        end = time.monotonic() + 30
        while time.monotonic() < end and len(found) < 2:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    event = json.loads(record.value)
                    if event.get("subject") == jti:
                        found.append(event)
        return found
    finally:
        consumer.close()


def test_revoked_at_every_service_of_the_real_topology_within_10_s(
    topology: Topology, infra: Infra, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops, _ = topology.issue()
    token, jti = topology.issue()
    assert topology.at(token) == {svc: (200, None) for svc, _ in ADMIN_ROUTES}

    def revoke() -> None:
        answer = httpx.delete(f"{topology.gateway}/v1/admin/tokens/{jti}", headers=bearer(ops))
        assert answer.status_code == 204, answer.text
        # The gateway's relay publishes its outbox on Kafka (not running in this test).
        rt = topology.gateway_rt
        relay_once(rt.sessionmaker, rt.bus, "gateway")

    events = audit_events(infra, jti, revoke)
    assert [e["data"]["action"] for e in events] == ["issue", "revoke"]
    assert {e["data"]["service"] for e in events} == {"gateway"}
    assert events[1]["data"]["actor"] == jti_of(ops)
    with topology.gateway_rt.sessionmaker() as db:
        pending = db.scalars(
            select(LogRow).where(LogRow.source == "gateway", LogRow.relayed_at.is_(None))
        ).all()
        assert pending == []

    took = until(
        lambda: set(topology.at(token).values()) == {(401, "token_revoked")}, REVOKED_WITHIN_S
    )
    assert took < REVOKED_WITHIN_S
    assert topology.at(ops) == {svc: (200, None) for svc, _ in ADMIN_ROUTES}

    # The CLI revokes as well (writing the gateway's database, as `citypark` does in a pod).
    with cli_env(monkeypatch, topology.gateway_rt.settings) as runner:
        cli_issued = cli_token(runner, "--role", "finance", "--ttl", "8h", "--name", "finance")
        assert topology.at(cli_issued)["billing"] == (200, None)
        revoked = runner.invoke(cli, ["admin", "revoke", jti_of(cli_issued)])
        assert revoked.exit_code == 0, revoked.output
    took = until(
        lambda: (
            {v for k, v in topology.at(cli_issued).items() if k != "gateway"}
            == {(401, "token_revoked")}
        ),
        REVOKED_WITHIN_S,
    )
    assert took < REVOKED_WITHIN_S
    assert topology.at(cli_issued)["gateway"] == (401, "token_revoked")

    # The gateway goes away: what the services know stays in force, and admin requests do
    # not wait on it.
    topology.stop_gateway()
    time.sleep(5.5)  # past the lists' max age: the next request asks the gateway, and fails
    started = time.monotonic()
    for _ in range(5):
        for svc, path in ADMIN_ROUTES[1:]:
            client = topology.services[svc]
            assert outcome(client.get(path, headers=bearer(token))) == (401, "token_revoked")
            assert outcome(client.get(path, headers=bearer(ops))) == (200, None)
    assert time.monotonic() - started < 5


# --- the payment sandbox -----------------------------------------------------------------------


def test_the_sandbox_refuses_callers_without_billings_token_outside_sandbox_mode(
    tmp_path: Path,
) -> None:
    for sandbox_mode in (False, True):
        s = Settings(
            database_url=f"sqlite:///{tmp_path}/sandbox-{sandbox_mode}.db",
            jwt_secret=SecretStr(SECRET),
            sandbox_mode=sandbox_mode,
        )
        city.migrate(s, [city.PARTS["paysandbox"]])
        app = make_app("sandbox", "")
        attach(app, Runtime(s, source="paysandbox"))
        for router in city.PARTS["paysandbox"].routers:
            app.include_router(router)
        with TestClient(app) as sandbox:
            opened = sandbox.post("/v1/agreements", json={"holder": "h", "balance_fen": 500})
            if sandbox_mode:  # the demo opens accounts in it
                assert opened.status_code == 201, opened.text
                continue
            assert outcome(opened) == (401, "sandbox_token_invalid")
            assert outcome(sandbox.get("/v1/statements/2026-11-30")) == (
                401,
                "sandbox_token_invalid",
            )
            forged = {"authorization": f"Bearer {'0' * 64}"}
            assert sandbox.get("/v1/charges/x", headers=forged).status_code == 401
            billing = {"authorization": f"Bearer {sandbox_token(s)}"}
            opened = sandbox.post(
                "/v1/agreements", json={"holder": "h", "balance_fen": 500}, headers=billing
            )
            assert opened.status_code == 201, opened.text
            # Billing's provider adapter presents the token by itself.
            provider = SandboxProvider(
                "http://testserver", transport=sandbox._transport, token=sandbox_token(s)
            )
            agreement = provider.get_agreement(opened.json()["agreement_no"])
            assert agreement is not None
            assert agreement.active
            assert sandbox.get("/healthz").status_code == 200  # probes need no token


def test_the_vehicle_registry_refuses_callers_without_billings_token_outside_sandbox_mode(
    tmp_path: Path,
) -> None:
    from services.billing.vehicle.registry import HttpVehicleRegistry
    from shared import sandboxes
    from shared.keys import Purpose

    car = {
        "plate": "苏E7R2K9",
        "plate_color": "blue",
        "owner_name": "张三",
        "vin": "LSVAB2BR7EN123456",
    }
    s = Settings(database_url=f"sqlite:///{tmp_path}/registry.db", jwt_secret=SecretStr(SECRET))
    assert not s.sandbox_mode
    city.migrate(s, [city.PARTS["vehicleregistry"]])
    app = make_app("registry", "")
    attach(app, Runtime(s, source="vehicleregistry"))
    for router in city.PARTS["vehicleregistry"].routers:
        app.include_router(router)
    with TestClient(app) as registry:
        # Without the token nobody may put a car on the register under their own name.
        assert outcome(registry.post("/v1/vehicles", json=car)) == (401, "registry_token_invalid")
        wrong = {"authorization": f"Bearer {sandboxes.bearer(s, Purpose.paysandbox)}"}
        assert registry.post("/v1/vehicles", json=car, headers=wrong).status_code == 401
        billing = {"authorization": f"Bearer {sandboxes.bearer(s, Purpose.vehicleregistry)}"}
        assert registry.post("/v1/vehicles", json=car, headers=billing).status_code == 201
        # Billing's client presents the token by itself.
        client = HttpVehicleRegistry(
            "http://testserver",
            transport=registry._transport,
            token=sandboxes.bearer(s, Purpose.vehicleregistry),
        )
        assert client.matches(
            plate="苏E7R2K9", plate_color="blue", owner_name="张三", vin_last6="123456"
        )
