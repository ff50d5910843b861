"""The connector API's security and limits against a real gateway, Redis and Kafka (SPEC §4)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
from citypark_connector import ConnectorClient, sign_request

from services.gateway.connector import ratelimit
from services.gateway.connector.auth import KEY_CACHE_S
from services.gateway.connector.eligibility import Kdf
from services.gateway.gate import state
from services.lots.models import Lot as LotRow
from shared import pii
from shared.runtime import Runtime
from shared.settings import Settings
from shared.topics import lot_events
from tests.conftest import Infra
from tests.integration.sdk_city import (
    Gateway,
    Lot,
    admin_call,
    connector_settings,
    drop_district_topic,
    events_on_topic,
    new_district,
    new_key,
    new_lot,
)

pytestmark = pytest.mark.integration
PORT = 18101


@pytest.fixture(scope="module")
def csettings(infra: Infra, fresh_database: str, settings: Settings) -> Settings:
    # `settings` migrated the database; these share it with their own Redis DB and port.
    s = connector_settings(fresh_database, infra.redis_url, infra.kafka_bootstrap, PORT)
    redis.Redis.from_url(s.redis_url).flushdb()
    return s


@pytest.fixture(scope="module")
def rt(csettings: Settings) -> Runtime:
    return Runtime(csettings, source="gateway")


@pytest.fixture(scope="module")
def gw(rt: Runtime) -> Iterator[Gateway]:
    server = Gateway(rt, PORT)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def district(rt: Runtime, gw: Gateway) -> Iterator[str]:
    code = new_district(gw)
    yield code
    drop_district_topic(rt, code)


@pytest.fixture
def lot(gw: Gateway, district: str) -> Lot:
    return new_lot(gw, district)


def entry_body(**overrides: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "plate": "苏E12345",
        "plate_color": "blue",
        "vehicle_type": "small",
        "occurred_at": datetime.now(UTC).isoformat(),
        "lane": "E1",
    } | overrides


def signed(
    gw: Gateway,
    key_id: str,
    private_pem: str,
    body: dict[str, Any] | None = None,
    path: str = "/v1/connector/entries",
    **sign: Any,
) -> httpx.Request:
    content = None if body is None else json.dumps(body).encode()
    request = httpx.Request(
        "POST" if body is not None else "GET",
        gw.url + path,
        content=content,
        headers={"content-type": "application/json"} if content else {},
    )
    return sign_request(request, key_id, private_pem, **sign)


def send(request: httpx.Request) -> httpx.Response:
    with httpx.Client(timeout=10) as client:
        return client.send(request)


def problem_code(response: httpx.Response) -> tuple[int, str]:
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.status_code, response.json()["code"]


def test_a_signed_entry_is_accepted_and_published(gw: Gateway, lot: Lot, rt: Runtime) -> None:
    body = entry_body()
    response = send(signed(gw, lot.key.key_id, lot.key.private_pem, body))
    assert response.status_code == 202, response.text
    assert response.json() == {"event_id": body["event_id"], "status": "accepted"}
    again = send(signed(gw, lot.key.key_id, lot.key.private_pem, body))
    assert again.json()["status"] == "duplicate"
    counts = events_on_topic(rt.settings.kafka_bootstrap, lot_events(lot.district))
    assert counts[body["event_id"]] == 1


def test_unsigned_request_is_signature_missing(gw: Gateway) -> None:
    response = httpx.post(gw.url + "/v1/connector/entries", json=entry_body())
    assert problem_code(response) == (401, "signature_missing")


def test_forged_signature_is_signature_invalid(gw: Gateway, lot: Lot) -> None:
    request = signed(gw, lot.key.key_id, lot.key.private_pem, entry_body())
    label, _, value = request.headers["signature"].partition("=:")
    forged = bytearray(value.encode())
    forged[5] = ord("A") if forged[5] != ord("A") else ord("B")
    request.headers["signature"] = f"{label}=:{forged.decode()}"
    assert problem_code(send(request)) == (401, "signature_invalid")


def test_signed_with_another_lots_key_is_signature_invalid(
    gw: Gateway, lot: Lot, rt: Runtime, district: str
) -> None:
    other = new_lot(gw, district)
    # Lot A's key id, lot B's (registered, valid) private key.
    request = signed(gw, lot.key.key_id, other.key.private_pem, entry_body())
    assert problem_code(send(request)) == (401, "signature_invalid")


def test_unknown_key_id_is_key_unknown(gw: Gateway) -> None:
    stranger = new_key("nobody")
    request = signed(gw, stranger.key_id, stranger.private_pem, entry_body())
    assert problem_code(send(request)) == (401, "key_unknown")


def test_replayed_nonce_is_nonce_reused(gw: Gateway, lot: Lot) -> None:
    request = signed(gw, lot.key.key_id, lot.key.private_pem, entry_body())
    first = send(request)
    assert first.status_code == 202
    replay = httpx.Request("POST", request.url, content=request.content, headers=request.headers)
    assert problem_code(send(replay)) == (401, "nonce_reused")


def test_stale_or_future_created_is_signature_expired(gw: Gateway, lot: Lot) -> None:
    # 20 s clear of the 300 s edge: a busy machine may take a second between signing and
    # checking, and a future `created` moves toward the window while the request travels.
    for skew in (-320, 320):
        created = int(time.time()) + skew
        request = signed(gw, lot.key.key_id, lot.key.private_pem, entry_body(), created=created)
        assert problem_code(send(request)) == (401, "signature_expired")
    now = int(time.time())
    inside = signed(gw, lot.key.key_id, lot.key.private_pem, entry_body(), created=now - 250)
    assert send(inside).status_code == 202


def test_tampered_body_is_digest_mismatch(gw: Gateway, lot: Lot) -> None:
    request = signed(gw, lot.key.key_id, lot.key.private_pem, entry_body(plate="苏E12345"))
    tampered = request.content.replace(b"12345", b"99999")
    assert tampered != request.content
    headers = dict(request.headers)
    headers.pop("content-length", None)
    response = send(httpx.Request("POST", request.url, content=tampered, headers=headers))
    assert problem_code(response) == (401, "digest_mismatch")


def test_tampered_path_is_signature_invalid(gw: Gateway, lot: Lot) -> None:
    request = signed(gw, lot.key.key_id, lot.key.private_pem, entry_body())
    moved = httpx.Request(
        "POST", gw.url + "/v1/connector/exits", content=request.content, headers=request.headers
    )
    assert problem_code(send(moved)) == (401, "signature_invalid")


def test_two_active_keys_then_revocation(gw: Gateway, rt: Runtime, district: str) -> None:
    lot = new_lot(gw, district, keys=2)
    second_id = lot.key_ids[1]
    assert send(signed(gw, lot.key.key_id, lot.key.private_pem, entry_body())).status_code == 202

    admin_call(gw, "DELETE", f"/v1/admin/lots/{lot.lot_id}/keys/{lot.key.key_id}")
    deadline = time.monotonic() + KEY_CACHE_S + 5
    while True:
        response = send(signed(gw, lot.key.key_id, lot.key.private_pem, entry_body()))
        if response.status_code == 401:
            break
        assert time.monotonic() < deadline, "a revoked key kept working past the key cache"
        time.sleep(0.5)
    assert problem_code(response) == (401, "key_unknown")
    # The other key of the lot is untouched: it fails only its signature, never its lookup.
    other = send(signed(gw, second_id, lot.key.private_pem, entry_body()))
    assert problem_code(other) == (401, "signature_invalid")


def test_rate_limit_answers_429_with_retry_after(gw: Gateway, rt: Runtime, lot: Lot) -> None:
    rt.providers[ratelimit.PROVIDER] = ratelimit.RateLimit(requests=5, window_s=1)
    answers: list[httpx.Response] = []
    try:
        started = time.time()
        while len(answers) < 60 and not any(r.status_code == 429 for r in answers):
            answers.append(send(signed(gw, lot.key.key_id, lot.key.private_pem, entry_body())))
        ended = time.time()
    finally:
        del rt.providers[ratelimit.PROVIDER]
    limited = [r for r in answers if r.status_code == 429]
    assert limited, "no request was refused"
    # At most 5 per one-second window the requests spanned (however slow the machine was).
    windows = int(ended) - int(started) + 1
    assert sum(r.status_code == 202 for r in answers) <= 5 * windows
    assert problem_code(limited[0]) == (429, "rate_limited")
    assert 1 <= int(limited[0].headers["retry-after"]) <= 1


def test_sdk_waits_out_the_rate_limit_and_delivers(
    gw: Gateway, rt: Runtime, lot: Lot, tmp_path: Any
) -> None:
    rt.providers[ratelimit.PROVIDER] = ratelimit.RateLimit(requests=3, window_s=1)
    try:
        with ConnectorClient(
            lot.key.key_id,
            lot.key.private_pem,
            base_url=gw.url,
            outbox_path=tmp_path / "o.sqlite3",
            eligibility_refresh_s=3600,
        ) as client:
            ids = [client.entry(plate="苏E12345", plate_color="blue").event_id for _ in range(8)]
            assert client.flush(timeout=20) == 0
    finally:
        del rt.providers[ratelimit.PROVIDER]
    counts = events_on_topic(rt.settings.kafka_bootstrap, lot_events(lot.district))
    assert [counts[i] for i in ids] == [1] * 8


def test_occurred_at_window_and_batch_results(gw: Gateway, lot: Lot) -> None:
    now = datetime.now(UTC)
    events = [
        {"kind": "entry", **entry_body(occurred_at=(now - timedelta(days=6)).isoformat())},
        {"kind": "entry", **entry_body(occurred_at=(now - timedelta(days=8)).isoformat())},
        {"kind": "entry", **entry_body(occurred_at=(now + timedelta(minutes=10)).isoformat())},
        {"kind": "entry", **entry_body(plate="NOT A PLATE")},
        {"kind": "teleport", **entry_body()},
    ]
    events.append(dict(events[0]))  # the same event twice in one batch
    response = send(
        signed(gw, lot.key.key_id, lot.key.private_pem, {"events": events}, "/v1/connector/batches")
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["index"], r["status"], r["code"]) for r in results] == [
        (0, "accepted", None),
        (1, "rejected", "occurred_at_out_of_range"),
        (2, "rejected", "occurred_at_out_of_range"),
        (3, "rejected", "plate_invalid"),
        (4, "rejected", "kind_invalid"),
        (5, "duplicate", None),
    ]
    too_many = {"events": [{"kind": "entry", **entry_body()} for _ in range(501)]}
    big = send(signed(gw, lot.key.key_id, lot.key.private_pem, too_many, "/v1/connector/batches"))
    assert problem_code(big)[0] == 422
    single = send(
        signed(gw, lot.key.key_id, lot.key.private_pem, entry_body(occurred_at="2020-01-01T00:00Z"))
    )
    assert problem_code(single) == (422, "occurred_at_out_of_range")


def test_eligibility_snapshot_with_etag(gw: Gateway, rt: Runtime, lot: Lot, district: str) -> None:
    sealed = pii.encrypt(rt.settings, state.vehicle_key("苏E12345", "blue"))
    rt.redis.hset(state.ELIGIBLE, state.ref(rt.settings, "苏E12345", "blue"), sealed)
    rt.redis.incr(f"{state.P}eligible:version")
    first = send(signed(gw, lot.key.key_id, lot.key.private_pem, path="/v1/connector/eligibility"))
    assert first.status_code == 200
    body = first.json()
    assert (body["lot_postpay_enabled"], body["format"], body["complete"]) == (True, 2, True)
    # Listed salted for this lot only: neither the plain sha256 nor the plate is there.
    kdf = Kdf(salt=body["kdf"]["salt"])
    assert body["vehicles"] == [kdf.hash("苏E12345", "blue")]
    assert state.plate_hash("苏E12345", "blue") not in body["vehicles"]
    request = signed(gw, lot.key.key_id, lot.key.private_pem, path="/v1/connector/eligibility")
    request.headers["if-none-match"] = first.headers["etag"]
    assert send(request).status_code == 304

    no_postpay = new_lot(gw, district, postpay=False)
    answer = send(
        signed(
            gw, no_postpay.key.key_id, no_postpay.key.private_pem, path="/v1/connector/eligibility"
        )
    ).json()
    assert (answer["lot_postpay_enabled"], answer["vehicles"], answer["kdf"]) == (False, [], None)
    with ConnectorClient(no_postpay.key.key_id, no_postpay.key.private_pem, base_url=gw.url) as c:
        c.refresh_eligibility()
        assert c.offline_decision("苏E12345", "blue") == ("pay_on_site", "lot_not_postpay")


def test_heartbeat(gw: Gateway, lot: Lot, rt: Runtime) -> None:
    with ConnectorClient(lot.key.key_id, lot.key.private_pem, base_url=gw.url) as client:
        client.heartbeat(free_spaces=42, total_spaces=100)
    with rt.sessionmaker() as db:
        stored = db.get(LotRow, lot.lot_id)
        assert stored is not None
        assert stored.free_spaces == 42
