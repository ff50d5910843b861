"""Rebuilding the gate state: ordering against account events, the marker, the loss instant
(an in-memory Redis and in-memory services stand in)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import fakeredis
import httpx
import pytest
import redis
from pydantic import SecretStr

from services.gateway.gate import rebuild, state
from shared.events import AccountUpdated, PostpayStatus, VehicleRef
from shared.internal import InternalClient
from shared.runtime import Runtime
from shared.settings import Settings

# The data keys billing seals the plates with (the gateway's own settings, as in a city).
KEYS = Settings(jwt_secret=SecretStr("unit-secret-0123456789abcdefghij"))


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(decode_responses=True)


def account(driver: str, version: int, postpay: PostpayStatus, *plates: str) -> AccountUpdated:
    return AccountUpdated(
        driver_id=driver,
        version=version,
        postpay=postpay,
        vehicles=[VehicleRef(plate=p, plate_color="blue", verified=True) for p in plates],
    )


def test_a_snapshot_never_undoes_an_event_that_lands_while_it_is_written(
    r: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    state.apply_account(r, KEYS, account("d1", 1, PostpayStatus.active, "苏E11111"))
    original = redis.client.Pipeline.execute
    injected: list[bool] = []

    def execute(self: redis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
        writes = any(cmd[0][0] == "HSET" for cmd in self.command_stack)
        if writes and not injected:
            injected.append(True)  # the account consumer applies v5 just before our write
            assert state.apply_account(
                r, KEYS, account("d1", 5, PostpayStatus.suspended, "苏E22222")
            )
        return original(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    state.apply_account(r, KEYS, account("d1", 3, PostpayStatus.active, "苏E11111"))

    assert injected
    answer = state.decide(r, KEYS, plate="苏E22222", color="blue", postpay_enabled=True)
    assert (answer.driver_id, answer.reason) == ("d1", "suspended_arrears")
    assert state.driver_of(r, KEYS, "苏E11111", "blue") is None
    assert r.hget(f"{state.P}driver:d1", "version") == "5"


def test_a_vehicle_that_moved_on_stays_with_its_new_driver(r: fakeredis.FakeRedis) -> None:
    state.apply_account(r, KEYS, account("a", 1, PostpayStatus.active, "苏E33333"))
    # The plate left A and B took it; B's event is applied before A's (other partition).
    state.apply_account(r, KEYS, account("b", 1, PostpayStatus.active, "苏E33333"))
    state.apply_account(r, KEYS, account("a", 2, PostpayStatus.active))
    assert state.driver_of(r, KEYS, "苏E33333", "blue") == "b"
    assert state.ref(KEYS, "苏E33333", "blue") in state.eligibility(r)[1]


def test_open_sessions_are_restored_only_where_the_gateway_has_nothing(
    r: fakeredis.FakeRedis,
) -> None:
    now = datetime.now(UTC)
    state.remember_open(r, KEYS, "lot", "苏E44444", "blue", "newer-entry")
    sessions = [
        state.OpenSession("older", "lot", "苏E44444", "blue", now - timedelta(hours=2)),
        state.OpenSession("s2", "lot", "苏E55555", "blue", now - timedelta(hours=1)),
        state.OpenSession("ancient", "lot", "苏E66666", "blue", now - timedelta(days=91)),
    ]
    assert state.restore_open(r, KEYS, sessions, now=now) == 1
    assert r.get(state.open_key(KEYS, "lot", "苏E44444", "blue")) == "newer-entry"
    assert r.get(state.open_key(KEYS, "lot", "苏E55555", "blue")) == "s2"
    assert state.entered_at(r, KEYS, "lot", "苏E55555", "blue") == now - timedelta(hours=1)
    assert r.get(state.open_key(KEYS, "lot", "苏E66666", "blue")) is None
    ttl = r.ttl(state.open_key(KEYS, "lot", "苏E55555", "blue"))
    assert state.OPEN_TTL_S - 3700 < ttl <= state.OPEN_TTL_S - 3600


Pages = dict[str, list[dict[str, Any]]]


def services(pages: Pages, on_call: Callable[[str], None] = lambda path: None) -> Any:
    """Billing's and the sessions service's gate endpoints, paginated as they are."""

    def handle(request: httpx.Request) -> httpx.Response:
        url = urlsplit(str(request.url))
        on_call(url.path)
        query = parse_qs(url.query)
        limit = int(query["limit"][0])
        after = query.get("after", [""])[0]
        key = "session_id" if "sessions" in url.path else "driver_id"
        rows = sorted(pages[url.path], key=lambda item: item[key])
        page = [item for item in rows if item[key] > after][:limit]
        body = {
            "items": page,
            "next": page[-1][key] if len(page) == limit else None,
            "total": len(rows) if not after else None,
        }
        return httpx.Response(200, json=body)

    return httpx.MockTransport(handle)


ACCOUNTS = "/internal/billing/gate/accounts"
OPEN = "/internal/sessions/gate/open"


def city(r: fakeredis.FakeRedis, transport: Any) -> Runtime:
    secret = SecretStr("unit-secret-0123456789abcdefghij")
    rt = Runtime(Settings(jwt_secret=secret), source="gateway")
    rt.__dict__["redis"] = r
    for name in ("billing", "sessions"):
        rt.internal_clients[name] = InternalClient("http://svc", rt.secret, transport=transport)
    return rt


def data(n_drivers: int) -> Pages:
    now = datetime.now(UTC)
    return {
        ACCOUNTS: [
            account(f"d{i:03}", 2, PostpayStatus.active, f"苏E{i:05}")
            .sealed(KEYS)
            .model_dump(mode="json")
            for i in range(n_drivers)
        ],
        OPEN: [
            {
                "session_id": f"s{i:03}",
                "lot_id": "lot",
                "plate": f"苏E{i:05}",
                "plate_color": "blue",
                "entered_at": (now - timedelta(minutes=i)).isoformat(),
            }
            for i in range(3)
        ],
    }


def test_rebuild_writes_everything_then_the_marker(r: fakeredis.FakeRedis) -> None:
    rt = city(r, services(data(7)))
    seen: list[tuple[str, int, int | None]] = []
    result = rebuild.rebuild(rt, page_size=3, progress=lambda *p: seen.append(p))
    assert (result.drivers, result.vehicles, result.sessions, result.restored) == (7, 7, 3, 3)
    assert seen == [
        ("drivers", 3, 7),
        ("drivers", 6, 7),
        ("drivers", 7, 7),
        ("sessions", 3, 3),
    ]
    for i in range(7):
        answer = state.decide(r, KEYS, plate=f"苏E{i:05}", color="blue", postpay_enabled=True)
        assert answer.reason == "enrolled"
    assert r.get(state.open_key(KEYS, "lot", "苏E00001", "blue")) == "s001"
    marker = rebuild.marker(r)
    assert int(marker["built_at"]) >= int(marker["lost_at"])
    assert marker["drivers"] == "7"
    assert r.get(rebuild.LOCK) is None
    # The eligibility version jumped past anything handed out before the loss.
    assert state.eligibility(r)[0] >= int(marker["lost_at"])
    assert "7 drivers" in result.summary()

    # On demand, on a healthy state: nothing is rewritten and the loss instant stays.
    again = rebuild.rebuild(rt, page_size=3)
    assert again.applied == 0
    assert rebuild.marker(r)["lost_at"] == marker["lost_at"]


def test_a_loss_during_the_rebuild_leaves_the_marker_incomplete(r: fakeredis.FakeRedis) -> None:
    def lose_data(path: str) -> None:
        if path == OPEN:
            r.flushall()

    rt = city(r, services(data(2), lose_data))
    with pytest.raises(rebuild.RebuildSuperseded):
        rebuild.rebuild(rt)
    assert not rebuild.is_complete(r)


def test_a_second_rebuild_waits_for_the_first(r: fakeredis.FakeRedis) -> None:
    rt = city(r, services(data(1)))
    r.set(rebuild.LOCK, "someone-else", ex=30)
    with pytest.raises(rebuild.RebuildBusy):
        rebuild.rebuild(rt, wait_s=0.3)
    assert not rebuild.is_complete(r)


def test_the_loss_instant_is_recorded_once_a_process_has_seen_the_marker(
    r: fakeredis.FakeRedis,
) -> None:
    # A process that never saw a marker has no evidence of a loss (its keeper will look).
    assert rebuild.lost_at_for_request(r, None) is None
    lost_at, recorded = rebuild.notice(r)
    assert recorded
    assert rebuild.lost_at_for_request(r, str(lost_at)) == lost_at
    r.flushall()  # Redis empties under the running gateway: the next request notices
    noticed = rebuild.lost_at_for_request(r, None)
    assert noticed is not None
    assert noticed >= lost_at
    assert rebuild.notice(r) == (noticed, False)


def test_after_an_upgrade_the_rebuild_writes_the_new_layout_and_drops_the_old(
    r: fakeredis.FakeRedis,
) -> None:
    rt = city(r, services(data(2)))
    rebuild.rebuild(rt)
    # What layout 1 wrote: plates in clear in keys and members, a marker naming no layout.
    P = state.P
    r.hdel(rebuild.MARKER, "layout")
    r.hdel(f"{P}driver:d000", "layout")
    r.set(f"{P}vehicle:苏E00000:blue", "d000")
    r.sadd(f"{P}claims:苏E00009:blue", "d000")
    r.sadd(f"{P}driver:d000:vehicles", "苏E00000:blue")
    r.sadd(f"{P}driver:gone:claims", "苏E00008:blue")
    r.set(f"{P}open:lot:苏E00000:blue", "s000")
    r.set(f"{P}entered:lot:苏E00000:blue", "2026-01-01T00:00:00+00:00")
    r.sadd(f"{P}eligible", "苏E00000:blue")
    r.sadd(f"{P}passes:lot:holders", "苏E00000:blue")
    assert not rebuild.is_complete(r)  # every gateway rebuilds at start

    rebuild.rebuild(rt)
    assert rebuild.is_complete(r)
    leftovers = [k for k in r.scan_iter() if "苏E" in k]
    assert leftovers == []
    assert r.smembers(f"{P}driver:d000:vehicles") == {state.ref(KEYS, "苏E00000", "blue")}
    assert not r.exists(f"{P}eligible", f"{P}driver:gone:claims", f"{P}passes:lot:holders")
    assert state.decide(r, KEYS, plate="苏E00000", color="blue", postpay_enabled=True).reason == (
        "enrolled"
    )
    assert r.get(state.open_key(KEYS, "lot", "苏E00000", "blue")) == "s000"
