"""The gateway's doors on the real infrastructure (PostgreSQL, Redis db 14, Kafka): request
bodies counted while they arrive, connector key ids checked before any lookup, the proxy's
path hygiene and internal headers, district keys revoked.

Requests that a client library would tidy up (chunked bodies that never end, a Content-Length
that lies, raw `..` in a path) are sent to the app as ASGI messages, exactly as a server hands
them over."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import redis
import uvicorn
from citypark_connector import SignatureAuth, generate_keypair
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from kafka.admin import KafkaAdminClient

from services import city
from services.gateway.tokens import service as admin_tokens
from shared.auth import Role, internal_token
from shared.db import transaction
from shared.forwarding import forwarding_proof
from shared.internal import InternalClient
from shared.runtime import Runtime
from shared.settings import Settings
from shared.topics import lot_events

pytestmark = pytest.mark.integration

REDIS_DB = 14  # this suite's own Redis database
ECHO_PORT = 18214
CHUNK = 64 * 1024
MIB = 1 << 20


@pytest.fixture(scope="module")
def gsettings(settings: Settings) -> Settings:
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    return settings.model_copy(update={"redis_url": url})


@pytest.fixture(scope="module")
def rt(gsettings: Settings) -> Runtime:
    return Runtime(gsettings, source="gateway")


@pytest.fixture(scope="module")
def client(rt: Runtime) -> Iterator[TestClient]:
    """The gateway and the lots service in one app, as the district tests have them."""
    parts = [city.PARTS["gateway"], city.PARTS["lots"]]
    app = city.build_app(rt, parts, workers=[])
    city.provision.configure(rt.settings)
    with TestClient(app) as tc:
        rt.internal_clients["lots"] = InternalClient(
            "http://testserver", rt.secret, transport=tc._transport
        )
        yield tc
    redis.Redis.from_url(rt.settings.redis_url).flushdb()


@pytest.fixture(scope="module")
def admin(client: TestClient, rt: Runtime) -> dict[str, str]:
    with transaction(rt.sessionmaker) as db:
        return {"Authorization": f"Bearer {admin_tokens.create(db, rt.secret, Role.admin)}"}


# -- raw ASGI -------------------------------------------------------------------------------


@dataclass
class Sent:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    pulled: int = 0  # request body bytes the app asked for

    def problem(self) -> dict[str, Any]:
        assert self.headers.get("content-type", "").startswith("application/problem+json")
        return json.loads(self.body)  # type: ignore[no-any-return]


def call(
    app: FastAPI,
    method: str,
    raw_path: bytes,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    body_bytes: int = 0,
) -> Sent:
    """One request as a server hands it over: `body_bytes` in chunks of 64 KiB (unbounded
    bodies are only as long as the app keeps reading)."""
    out = Sent()
    path, _, query = raw_path.partition(b"?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(path.decode("latin-1")),
        "raw_path": path,
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"gateway"), *(headers or [])],
        "client": ("203.0.113.9", 50000),
        "server": ("gateway", 80),
        "state": {},
    }

    async def receive() -> dict[str, Any]:
        if out.pulled >= body_bytes:
            return {"type": "http.request", "body": b"", "more_body": False}
        size = min(CHUNK, body_bytes - out.pulled)
        out.pulled += size
        return {"type": "http.request", "body": b"x" * size, "more_body": out.pulled < body_bytes}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out.status = message["status"]
            out.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            out.body += message.get("body", b"")

    asyncio.run(app(scope, receive, send))
    return out


CHUNKED = [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]


# -- bodies ---------------------------------------------------------------------------------


def test_an_unsigned_chunked_body_is_cut_off_at_the_connector_limit(
    client: TestClient, rt: Runtime
) -> None:
    limit = rt.settings.connector_max_body_bytes
    gigabyte = 1 << 30

    sent = call(client.app, "POST", b"/v1/connector/entries", headers=CHUNKED, body_bytes=gigabyte)  # type: ignore[arg-type]

    assert sent.status == 413
    assert sent.problem()["code"] == "body_too_large"
    assert sent.pulled <= limit + CHUNK  # read no further than the limit, never parsed


def test_a_content_length_that_lies_does_not_lift_the_limit(
    client: TestClient, rt: Runtime
) -> None:
    limit = rt.settings.connector_max_body_bytes
    lying = [(b"content-type", b"application/json"), (b"content-length", b"100")]

    sent = call(client.app, "POST", b"/v1/connector/exits", headers=lying, body_bytes=4 * MIB)  # type: ignore[arg-type]

    assert (sent.status, sent.problem()["code"]) == (413, "body_too_large")
    assert sent.pulled <= limit + CHUNK
    # An honest announcement over the limit is refused before a byte is read.
    honest = [(b"content-length", str(limit + 1).encode())]
    told = call(client.app, "POST", b"/v1/connector/exits", headers=honest, body_bytes=limit + 1)  # type: ignore[arg-type]
    assert (told.status, told.pulled) == (413, 0)


def test_district_bodies_have_their_own_larger_limit(client: TestClient, rt: Runtime) -> None:
    limit = rt.settings.district_max_body_bytes
    app = client.app

    over = call(app, "POST", b"/v1/districts/gusu/events", headers=CHUNKED, body_bytes=limit + MIB)  # type: ignore[arg-type]
    within = call(app, "POST", b"/v1/districts/gusu/events", headers=CHUNKED, body_bytes=2 * MIB)  # type: ignore[arg-type]

    assert (over.status, over.problem()["code"]) == (413, "body_too_large")
    assert over.pulled <= limit + CHUNK
    # Past the connector's 1 MiB, within the district's 10: read whole, then refused unsigned.
    assert (within.status, within.problem()["code"]) == (401, "signature_missing")
    assert within.pulled == 2 * MIB


def test_other_public_routes_have_a_general_limit(client: TestClient) -> None:
    sent = call(client.app, "POST", b"/v1/admin/operators", headers=CHUNKED, body_bytes=8 * MIB)  # type: ignore[arg-type]

    assert (sent.status, sent.problem()["code"]) == (413, "body_too_large")
    assert sent.pulled <= MIB + CHUNK


# -- connector key ids ------------------------------------------------------------------------


class CountingLots(httpx.BaseTransport):
    """The lots service's internal API, counting what the gateway asks of it."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.raw_path.decode())
        return httpx.Response(404, json={"detail": "no such key"})


@pytest.mark.parametrize(
    "key_id",
    [
        "../../internal/lots/stats",
        "..",
        "a/b",
        "lot%2f1",
        "k" * 65,
        "lot 1",
        "lot?x=1",
        "lot#1",
    ],
)
def test_a_malformed_keyid_is_unknown_without_any_internal_call(
    gsettings: Settings, key_id: str
) -> None:
    rt = Runtime(gsettings, source="gateway")
    lots = CountingLots()
    rt.internal_clients["lots"] = InternalClient("http://lots", rt.secret, transport=lots)
    app = city.build_app(rt, [city.PARTS["gateway"]], workers=[])
    private_pem, _ = generate_keypair()
    with TestClient(app) as tc:
        body = {"free_spaces": 1, "total_spaces": 2, "sdk_version": "t"}
        bad = tc.post(
            "/v1/connector/heartbeats", json=body, auth=SignatureAuth(key_id, private_pem)
        )
        assert (bad.status_code, bad.json()["code"]) == (401, "key_unknown")
        assert lots.paths == []
        # A well-formed unknown id is looked up (once), and is just as unknown.
        plain = f"lot-{uuid.uuid4().hex[:8]}"
        unknown = tc.post(
            "/v1/connector/heartbeats", json=body, auth=SignatureAuth(plain, private_pem)
        )
        assert (unknown.status_code, unknown.json()["code"]) == (401, "key_unknown")
        assert lots.paths == [f"/internal/lots/keys/{plain}"]


# -- the proxy --------------------------------------------------------------------------------


@dataclass
class Echo:
    url: str
    seen: list[dict[str, Any]]


@pytest.fixture(scope="module")
def echo() -> Iterator[Echo]:
    """Stands in for the services behind the proxy: records what reaches it."""
    seen: list[dict[str, Any]] = []
    app = FastAPI()

    @app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def anything(rest: str, request: Request) -> dict[str, str]:
        seen.append(
            {
                "raw_path": request.scope["raw_path"].decode(),
                "query": request.scope["query_string"].decode(),
                "headers": dict(request.headers),
            }
        )
        return {"ok": "yes"}

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=ECHO_PORT, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "echo did not start"
        time.sleep(0.05)
    yield Echo(f"http://127.0.0.1:{ECHO_PORT}", seen)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def proxy(gsettings: Settings, echo: Echo) -> FastAPI:
    upstream = {"lots_url": echo.url, "sessions_url": echo.url, "billing_url": echo.url}
    rt = Runtime(gsettings.model_copy(update=upstream), source="gateway")
    return city.build_app(rt, [city.PARTS["gateway"]], workers=[], forward=True)


@pytest.mark.parametrize(
    "raw_path",
    [
        b"/v1/lots/../internal/lots/stats",
        b"/v1/lots/../../internal/lots/stats",
        b"/v1/lots/%2e%2e/internal/lots/stats",
        b"/v1/lots/%2E%2E/%2E%2E/internal/lots/stats",
        b"/v1/lots/.%2e/internal/lots/stats",
        b"/v1/lots/..%2finternal%2flots%2fstats",
        b"/v1/lots/%2f..%2f..%2finternal/lots/stats",
        b"/v1/lots/%252e%252e/internal/lots/stats",
        b"/v1/lots/%25252e%25252e/internal",
        b"/v1/lots/..\\internal\\lots\\stats",
        b"/v1/lots/%5c..%5cinternal",
        b"/v1/lots/./stats",
        b"/v1/quotes/%00",
    ],
)
def test_the_proxy_refuses_traversal_in_any_encoding(
    proxy: FastAPI, echo: Echo, raw_path: bytes
) -> None:
    before = len(echo.seen)

    sent = call(proxy, "GET", raw_path)

    assert sent.status in (400, 404), sent.body
    assert sent.problem()["code"] in ("path_invalid", "not_found")
    assert echo.seen[before:] == []  # nothing reached a service, /internal least of all


def test_the_proxy_drops_internal_headers_and_forwards_the_path_as_sent(
    proxy: FastAPI, echo: Echo, gsettings: Settings
) -> None:
    token = internal_token(gsettings.jwt_secret.get_secret_value())
    headers = [
        (b"x-citypark-internal", token.encode()),
        (b"x-citypark-forwarded", b"made-up"),
        (b"x-forwarded-for", b"10.0.0.1"),
    ]
    before = len(echo.seen)

    sent = call(proxy, "GET", b"/v1/lots/a%3Fb%23c?near=31.2,120.6", headers=headers)

    assert sent.status == 200, sent.body
    (reached,) = echo.seen[before:]
    assert "x-citypark-internal" not in reached["headers"]
    assert reached["headers"]["x-citypark-forwarded"] == forwarding_proof(
        gsettings.jwt_secret.get_secret_value()
    )
    assert reached["headers"]["x-forwarded-for"] == "203.0.113.9"
    # An escaped `?` or `#` stays part of the path: it never becomes a query or fragment.
    assert reached["raw_path"] == "/v1/lots/a%3Fb%23c"
    assert reached["query"] == "near=31.2%2C120.6"


# -- district keys ----------------------------------------------------------------------------


def test_a_revoked_district_key_is_refused_within_seconds(
    client: TestClient, admin: dict[str, str], rt: Runtime
) -> None:
    code = f"d{uuid.uuid4().hex[:10]}"
    private_pem, public_pem = generate_keypair()
    key_id = f"{code}-platform"
    made = client.post(
        "/v1/admin/districts",
        headers=admin,
        json={
            "code": code,
            "name": f"第十一区 {code}",
            "dialect": "canonical",
            "public_keys": [{"key_id": key_id, "public_key_pem": public_pem}],
        },
    )
    assert made.status_code == 201, made.text
    try:

        def push() -> httpx.Response:
            return client.post(
                f"/v1/districts/{code}/events",
                content=b"",
                auth=SignatureAuth(key_id, private_pem),
                headers={"content-type": "application/octet-stream"},
            )

        signed_in = push()  # the key works: the (empty) body is what is refused
        assert (signed_in.status_code, signed_in.json()["code"]) == (422, "body_empty")

        revoked = client.delete(f"/v1/admin/districts/{code}/keys/{key_id}", headers=admin)

        assert revoked.status_code == 204, revoked.text
        listed = client.get("/v1/admin/districts", headers=admin).json()
        assert next(d for d in listed if d["code"] == code)["key_ids"] == []
        deadline = time.monotonic() + 15  # the gateway caches a key 10 s at most
        while (answer := push()).status_code != 401:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.5)
        assert answer.json()["code"] == "key_unknown"
        # Audited once, by whom; a repeat is a no-op, an unknown key a 404.
        audit = client.get(
            "/v1/admin/audit",
            headers=admin,
            params={"entity": "district", "entity_id": code},
        ).json()["items"]
        assert [e["action"] for e in audit if e["action"] == "key.revoke"] == ["key.revoke"]
        again = client.delete(f"/v1/admin/districts/{code}/keys/{key_id}", headers=admin)
        assert again.status_code == 204
        unknown = client.delete(f"/v1/admin/districts/{code}/keys/nope", headers=admin)
        assert (unknown.status_code, unknown.json()["code"]) == (404, "key_unknown")
        assert client.delete(f"/v1/admin/districts/{code}/keys/{key_id}").status_code == 401
    finally:
        kafka = KafkaAdminClient(bootstrap_servers=rt.settings.kafka_bootstrap)
        try:
            if lot_events(code) in set(kafka.list_topics()):
                kafka.delete_topics([lot_events(code)])
        finally:
            kafka.close()
