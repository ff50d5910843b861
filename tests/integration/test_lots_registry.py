"""The registry through its admin API on PostgreSQL and Redis: search and pages, keys, tariff
history, and the audit log of every write."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from citypark_connector import generate_keypair
from fastapi.testclient import TestClient

from services.lots.main import part as lots
from services.lots.schemas import EXAMPLE_TARIFF
from shared.auth import Role, internal_token, issue_admin_token
from shared.http import make_app
from shared.runtime import Runtime, attach
from shared.settings import Settings
from shared.timeutil import utcnow

pytestmark = pytest.mark.integration

REDIS_DB = 11  # this suite's own Redis database


@pytest.fixture(scope="module")
def lots_settings(settings: Settings) -> Settings:
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    return settings.model_copy(update={"redis_url": url})


@pytest.fixture(scope="module")
def client(lots_settings: Settings) -> Iterator[TestClient]:
    redis.Redis.from_url(lots_settings.redis_url).flushdb()
    rt = Runtime(lots_settings, source="lots")
    lots.on_startup(rt)
    app = make_app("lots", "")
    attach(app, rt)
    for router in lots.routers:
        app.include_router(router)
    with TestClient(app) as tc:
        yield tc


class AdminUser:
    def __init__(self, settings: Settings, role: Role = Role.admin) -> None:
        token, self.id = issue_admin_token(settings.jwt_secret.get_secret_value(), role)
        self.headers = {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def ops(lots_settings: Settings) -> AdminUser:
    return AdminUser(lots_settings)


@pytest.fixture(scope="module")
def viewer(lots_settings: Settings) -> AdminUser:
    return AdminUser(lots_settings, Role.viewer)


def new_operator(client: TestClient, ops: AdminUser, name: str) -> dict[str, Any]:
    answer = client.post(
        "/v1/admin/operators",
        headers=ops.headers,
        json={"name": name, "commission_bps": 500, "settlement_account": "6222"},
    )
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


def new_lot(
    client: TestClient, ops: AdminUser, operator_id: str, code: str, **overrides: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "code": code,
        "name": f"car park {code}",
        "district": "gusu",
        "operator_id": operator_id,
        "capacity": 100,
        "location": {"lat": 31.30, "lng": 120.58},
        "tariff": EXAMPLE_TARIFF,
        **overrides,
    }
    answer = client.post("/v1/admin/lots", headers=ops.headers, json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


def key(key_id: str) -> dict[str, str]:
    return {"key_id": key_id, "public_key_pem": generate_keypair()[1]}


def test_search_and_pages(client: TestClient, ops: AdminUser, viewer: AdminUser) -> None:
    tag = uuid.uuid4().hex[:6].upper()
    op_a = new_operator(client, ops, f"Alpha {tag}")
    op_b = new_operator(client, ops, f"Beta {tag}")
    codes = [f"S{tag}-{i}" for i in range(5)]
    for i, code in enumerate(codes):
        new_lot(
            client,
            ops,
            op_a["id"] if i < 3 else op_b["id"],
            code,
            district="gusu" if i % 2 == 0 else "sip",
            name=f"{'观前街' if i == 4 else '石路'} car park {i}",
        )

    def page(**params: Any) -> dict[str, Any]:
        answer = client.get("/v1/admin/lots", headers=viewer.headers, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()  # type: ignore[no-any-return]

    seen: list[str] = []
    cursor = None
    while True:
        got = page(q=tag, limit=2, **({"cursor": cursor} if cursor else {}))
        assert len(got["items"]) <= 2
        seen += [lot["code"] for lot in got["items"]]
        cursor = got["next_cursor"]
        if cursor is None:
            break
    assert seen == codes  # every lot once, ordered by code

    assert [lot["code"] for lot in page(q=tag, district="sip")["items"]] == [codes[1], codes[3]]
    assert [lot["code"] for lot in page(q=tag, operator_id=op_b["id"])["items"]] == codes[3:]
    assert [lot["code"] for lot in page(q="观前街")["items"]] == [codes[4]]
    assert [lot["code"] for lot in page(q=tag.lower() + "-2")["items"]] == [codes[2]]
    assert page(q="100%_no_such")["items"] == []
    first = page(q=tag)["items"][0]
    assert (first["free_spaces"], first["online"]) == (100, False)

    bad = client.get("/v1/admin/lots", headers=viewer.headers, params={"cursor": "not-a-cursor"})
    assert (bad.status_code, bad.json()["code"]) == (422, "cursor_invalid")

    operators = client.get(
        "/v1/admin/operators", headers=viewer.headers, params={"q": tag, "limit": 1}
    ).json()
    assert [o["name"] for o in operators["items"]] == [f"Alpha {tag}"]
    more = client.get(
        "/v1/admin/operators",
        headers=viewer.headers,
        params={"q": tag, "limit": 1, "cursor": operators["next_cursor"]},
    ).json()
    assert ([o["name"] for o in more["items"]], more["next_cursor"]) == ([f"Beta {tag}"], None)
    # A viewer reads the operator, its bank account masked (finance and admin see it).
    assert client.get(f"/v1/admin/operators/{op_b['id']}", headers=viewer.headers).json() == {
        **op_b,
        "settlement_account": "****",
    }
    missing = client.get("/v1/admin/operators/nope", headers=viewer.headers)
    assert (missing.status_code, missing.json()["code"]) == (404, "operator_unknown")

    districts = client.get("/v1/admin/districts", headers=viewer.headers).json()
    assert {"gusu", "huqiu", "sip", "taicang"} <= {d["code"] for d in districts}
    assert len(districts) >= 10


def test_keys_rotate_with_at_most_two_active(
    client: TestClient, ops: AdminUser, viewer: AdminUser, lots_settings: Settings
) -> None:
    tag = uuid.uuid4().hex[:8]
    op = new_operator(client, ops, f"Keys {tag}")
    lot = new_lot(
        client,
        ops,
        op["id"],
        f"K{tag}",
        public_keys=[key(f"{tag}-a"), key(f"{tag}-b")],
    )
    assert lot["key_ids"] == [f"{tag}-a", f"{tag}-b"]
    base = f"/v1/admin/lots/{lot['id']}/keys"

    third = client.post(base, headers=ops.headers, json=key(f"{tag}-c"))
    assert (third.status_code, third.json()["code"]) == (409, "too_many_keys")
    assert client.delete(f"{base}/{tag}-a", headers=viewer.headers).status_code == 403
    assert client.delete(f"{base}/{tag}-a", headers=ops.headers).status_code == 204
    assert client.delete(f"{base}/{tag}-a", headers=ops.headers).status_code == 204  # no-op
    assert client.post(base, headers=ops.headers, json=key(f"{tag}-c")).status_code == 201
    # A revoked key id is never handed out again.
    reuse = client.post(base, headers=ops.headers, json=key(f"{tag}-a"))
    assert (reuse.status_code, reuse.json()["code"]) == (409, "too_many_keys")
    listed = client.get(base, headers=viewer.headers).json()
    assert [(k["key_id"], k["active"]) for k in listed] == [
        (f"{tag}-a", False),
        (f"{tag}-b", True),
        (f"{tag}-c", True),
    ]
    assert listed[0]["revoked_at"] is not None
    assert client.get(f"/v1/admin/lots/{lot['id']}", headers=viewer.headers).json()["key_ids"] == [
        f"{tag}-b",
        f"{tag}-c",
    ]

    internal = {"x-citypark-internal": internal_token(lots_settings.jwt_secret.get_secret_value())}
    revoked = client.get(f"/internal/lots/keys/{tag}-a", headers=internal)
    assert revoked.status_code == 404
    assert (
        client.get(f"/internal/lots/keys/{tag}-b", headers=internal).json()["lot_id"] == lot["id"]
    )
    assert client.delete(f"{base}/{tag}-b", headers=ops.headers).status_code == 204
    taken = client.post(base, headers=ops.headers, json=key(f"{tag}-a"))
    assert (taken.status_code, taken.json()["code"]) == (409, "key_id_taken")
    unknown = client.delete(f"{base}/nope-{tag}", headers=ops.headers)
    assert (unknown.status_code, unknown.json()["code"]) == (404, "key_unknown")
    elsewhere = client.get("/v1/admin/lots/nope/keys", headers=viewer.headers)
    assert (elsewhere.status_code, elsewhere.json()["code"]) == (404, "lot_unknown")


def test_tariff_history_is_append_only(
    client: TestClient, ops: AdminUser, viewer: AdminUser
) -> None:
    tag = uuid.uuid4().hex[:8]
    op = new_operator(client, ops, f"Tariffs {tag}")
    lot = new_lot(client, ops, op["id"], f"T{tag}")
    path = f"/v1/admin/lots/{lot['id']}"

    [first] = client.get(f"{path}/tariffs", headers=viewer.headers).json()
    assert first["in_force"] is True
    assert first["tariff"]["free_minutes"] == 15

    past = client.put(
        f"{path}/tariff",
        headers=ops.headers,
        json={
            "effective_from": (utcnow() - timedelta(hours=1)).isoformat(),
            "tariff": EXAMPLE_TARIFF,
        },
    )
    assert (past.status_code, past.json()["code"]) == (422, "tariff_effective_in_past")

    cheaper = {**EXAMPLE_TARIFF, "free_minutes": 30}
    starts = (utcnow() + timedelta(days=7)).replace(microsecond=0)
    body = {"effective_from": starts.isoformat(), "tariff": cheaper}
    added = client.put(f"{path}/tariff", headers=ops.headers, json=body)
    assert added.status_code == 200, added.text
    assert (added.json()["in_force"], added.json()["tariff"]["free_minutes"]) == (False, 30)
    again = client.put(f"{path}/tariff", headers=ops.headers, json=body)
    assert again.json()["id"] == added.json()["id"]  # a retried request adds nothing
    clash = client.put(
        f"{path}/tariff",
        headers=ops.headers,
        json={"effective_from": starts.isoformat(), "tariff": EXAMPLE_TARIFF},
    )
    assert (clash.status_code, clash.json()["code"]) == (409, "tariff_version_exists")
    broken = client.put(
        f"{path}/tariff",
        headers=ops.headers,
        json={"tariff": {**EXAMPLE_TARIFF, "free_minutes": -1}},
    )
    assert (broken.status_code, broken.json()["code"]) == (422, "tariff_invalid")

    history = client.get(f"{path}/tariffs", headers=viewer.headers).json()
    assert [(v["id"], v["in_force"]) for v in history] == [
        (added.json()["id"], False),
        (first["id"], True),
    ]
    # The lot still shows (and prices with) the version in force now.
    assert client.get(path, headers=viewer.headers).json()["tariff"]["free_minutes"] == 15

    now_version = client.put(f"{path}/tariff", headers=ops.headers, json={"tariff": cheaper})
    assert now_version.json()["in_force"] is True
    assert client.get(path, headers=viewer.headers).json()["tariff"]["free_minutes"] == 30


def test_every_admin_write_is_audited(
    client: TestClient, ops: AdminUser, viewer: AdminUser
) -> None:
    tag = uuid.uuid4().hex[:8]
    op = new_operator(client, ops, f"Audit {tag}")
    lot = new_lot(client, ops, op["id"], f"A{tag}", public_keys=[key(f"{tag}-a")])
    path = f"/v1/admin/lots/{lot['id']}"
    assert client.post(f"{path}/keys", headers=ops.headers, json=key(f"{tag}-b")).status_code == 201
    assert client.delete(f"{path}/keys/{tag}-a", headers=ops.headers).status_code == 204
    moved = client.patch(
        path,
        headers=ops.headers,
        json={"capacity": 150, "location": {"lat": 31.31, "lng": 120.6}},
    )
    assert moved.status_code == 200, moved.text
    assert client.patch(path, headers=ops.headers, json={"capacity": 150}).status_code == 200
    assert (
        client.put(
            f"{path}/tariff", headers=ops.headers, json={"tariff": EXAMPLE_TARIFF}
        ).status_code
        == 200
    )
    # Refused writes leave no trace.
    assert client.patch(path, headers=viewer.headers, json={"capacity": 1}).status_code == 403
    assert client.patch(path, headers=ops.headers, json={"capacity": 0}).status_code == 422

    def audit(**params: Any) -> dict[str, Any]:
        answer = client.get("/v1/admin/audit", headers=viewer.headers, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()  # type: ignore[no-any-return]

    trail = audit(entity="lot", entity_id=lot["id"])
    assert [e["action"] for e in trail["items"]] == [
        "tariff.add_version",
        "lot.update",  # the second PATCH changed nothing and is not recorded
        "key.revoke",
        "key.add",
        "lot.create",
    ]
    assert {e["actor"] for e in trail["items"]} == {ops.id}
    assert {e["role"] for e in trail["items"]} == {"admin"}
    tariff, update, revoke, add, create = trail["items"]
    assert (update["before"]["capacity"], update["after"]["capacity"]) == (100, 150)
    assert update["after"]["location"] == {"lat": 31.31, "lng": 120.6}
    assert (revoke["before"]["revoked_at"], revoke["after"]["key_id"]) == (None, f"{tag}-a")
    assert revoke["after"]["revoked_at"] is not None
    assert (add["before"], add["after"]["key_id"]) == (None, f"{tag}-b")
    assert create["after"]["key_ids"] == [f"{tag}-a"]
    assert create["after"]["tariff"]["tariff"]["free_minutes"] == 15
    assert tariff["before"]["id"] == create["after"]["tariff"]["id"]
    assert create["at"] <= revoke["at"] <= tariff["at"]

    operator_trail = audit(entity="operator", entity_id=op["id"])["items"]
    assert [(e["action"], e["after"]["name"]) for e in operator_trail] == [
        ("operator.create", f"Audit {tag}")
    ]
    one = audit(entity="lot", entity_id=lot["id"], limit=2)
    rest = audit(entity="lot", entity_id=lot["id"], limit=10, cursor=one["next_cursor"])
    assert [e["id"] for e in one["items"] + rest["items"]] == [e["id"] for e in trail["items"]]
    assert rest["next_cursor"] is None
    assert audit(actor=viewer.id)["items"] == []
    assert client.get("/v1/admin/audit").status_code == 401
    bad = client.get("/v1/admin/audit", headers=viewer.headers, params={"cursor": "eyJ4Il0"})
    assert (bad.status_code, bad.json()["code"]) == (422, "cursor_invalid")


def test_unknown_references_are_problems(client: TestClient, ops: AdminUser) -> None:
    tag = uuid.uuid4().hex[:8]
    op = new_operator(client, ops, f"Refs {tag}")
    body = {
        "code": f"R{tag}",
        "name": "n",
        "district": "atlantis",
        "operator_id": op["id"],
        "capacity": 10,
        "location": {"lat": 31.3, "lng": 120.6},
        "tariff": EXAMPLE_TARIFF,
    }
    answer = client.post("/v1/admin/lots", headers=ops.headers, json=body)
    assert (answer.status_code, answer.json()["code"]) == (422, "district_unknown")
    lot = new_lot(client, ops, op["id"], f"R{tag}")
    patch = client.patch(
        f"/v1/admin/lots/{lot['id']}", headers=ops.headers, json={"operator_id": "nope"}
    )
    assert (patch.status_code, patch.json()["code"]) == (422, "operator_unknown")
    missing = client.patch("/v1/admin/lots/nope", headers=ops.headers, json={"capacity": 5})
    assert (missing.status_code, missing.json()["code"]) == (404, "lot_unknown")
    twice = client.post(
        "/v1/admin/lots",
        headers=ops.headers,
        json={**body, "code": f"R2{tag}", "district": "gusu", "public_keys": [key(tag), key(tag)]},
    )
    assert (twice.status_code, twice.json()["code"]) == (409, "key_id_taken")
