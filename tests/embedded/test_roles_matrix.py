"""Every public route × every kind of caller: allowed or refused, as docs/security.md says.

The expected table below is written from the roles the documentation promises, not read from
the code, and every operation the city's OpenAPI lists must be covered by it: a new route
without a declared audience fails this test. "Allowed" means the caller gets past
authentication and authorisation (the answer may still be 404 or 422 for the made-up body);
"refused" means 401 or 403. A driver asking for another driver's vehicle gets 404: the
vehicle is not theirs, and its existence is not revealed.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from citypark_connector import SignatureAuth, generate_keypair
from fastapi.testclient import TestClient

from loadtests.ownership import add_verified_vehicle
from services.gateway.tokens import service as admin_tokens
from services.lots.schemas import EXAMPLE_TARIFF
from shared.auth import Role
from shared.db import transaction
from tests.embedded_city import embedded_city, onboard_lot

ANONYMOUS, DRIVER, OTHER_DRIVER, MERCHANT, LOT, DISTRICT = (
    "anonymous",
    "driver",
    "another driver",
    "merchant",
    "lot",
    "district",
)
VIEWER, FINANCE, ADMIN = Role.viewer.value, Role.finance.value, Role.admin.value
CALLERS = (ANONYMOUS, DRIVER, OTHER_DRIVER, MERCHANT, LOT, DISTRICT, VIEWER, FINANCE, ADMIN)

EVERYONE = frozenset(CALLERS)
DRIVERS = frozenset({DRIVER, OTHER_DRIVER})
STAFF = frozenset({VIEWER, FINANCE, ADMIN})
MONEY_STAFF = frozenset({FINANCE, ADMIN})
ADMINS = frozenset({ADMIN})
NOBODY: frozenset[str] = frozenset()  # e.g. payment providers' notifications: their own proof

# (method, path pattern) → who may; the first match wins. Patterns are OpenAPI paths.
POLICY: list[tuple[str, str, frozenset[str]]] = [
    ("POST", r"/v1/auth/(otp|token)", EVERYONE),
    ("GET", r"/v1/lots", EVERYONE),
    ("POST", r"/v1/quotes", EVERYONE),  # without a plate; with one, see test_gate_doors
    ("*", r"/v1/me(/.*)?", DRIVERS),
    ("*", r"/v1/connector/.*", frozenset({LOT})),
    ("*", r"/v1/districts/\{district\}/events", frozenset({DISTRICT})),
    ("*", r"/v1/merchants/.*", frozenset({MERCHANT})),
    ("*", r"/v1/providers/.*", NOBODY),
    # staff: admin-only reads
    ("GET", r"/v1/admin/(tokens|sandbox/sms)", ADMINS),
    ("GET", r"/v1/admin/ledger/check", MONEY_STAFF),
    ("GET", r"/v1/admin/merchants/\{merchant_id\}/statements", MONEY_STAFF),
    ("GET", r"/v1/admin/.*", STAFF),
    # staff: money decisions for finance and admin, everything else for admin
    ("POST", r"/v1/admin/disputes/\{dispute_id\}/decision", MONEY_STAFF),
    ("POST", r"/v1/admin/settlements/runs", MONEY_STAFF),
    ("POST", r"/v1/admin/reconciliations(/.*)?", MONEY_STAFF),
    ("*", r"/v1/admin/.*", ADMINS),
]

PLACEHOLDER = "00000000-0000-4000-8000-000000000000"


def expected(method: str, path: str) -> frozenset[str]:
    for m, pattern, who in POLICY:
        if m in ("*", method) and re.fullmatch(pattern, path):
            return who
    raise AssertionError(f"{method} {path} has no declared audience in POLICY")


@dataclass
class City:
    client: TestClient
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    auth: dict[str, httpx.Auth] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)


def _sign_in(client: TestClient, admin: dict[str, str], phone: str) -> dict[str, str]:
    assert client.post("/v1/auth/otp", json={"phone": phone}).status_code == 202
    sms = client.get("/v1/admin/sandbox/sms", params={"phone": phone}, headers=admin).json()
    code = re.search(r"\d{6}", sms[-1]["body"]).group(0)  # type: ignore[union-attr]
    token = client.post("/v1/auth/token", json={"phone": phone, "code": code}).json()
    return {"Authorization": f"Bearer {token['access_token']}"}


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Iterator[City]:
    db_file: Path = tmp_path_factory.mktemp("roles") / "city.db"
    with embedded_city(db_file) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        c = City(client)
        with transaction(rt.sessionmaker) as db:
            for role in Role:
                token = admin_tokens.create(db, rt.secret, role)
                c.headers[role.value] = {"Authorization": f"Bearer {token}"}
        admin = c.headers[ADMIN]
        lot, private_pem = onboard_lot(
            client, admin, code="RM-1", district="gusu", tariff=EXAMPLE_TARIFF
        )
        c.auth[LOT] = SignatureAuth("rm-1", private_pem)
        c.ids["lot_id"] = lot["id"]

        private, public = generate_keypair()
        district = client.post(
            "/v1/admin/districts",
            headers=admin,
            json={
                "code": "rmtest",
                "name": "角色测试区",
                "dialect": "canonical",
                "public_keys": [{"key_id": "rmtest-platform", "public_key_pem": public}],
            },
        )
        assert district.status_code == 201, district.text
        c.auth[DISTRICT] = SignatureAuth("rmtest-platform", private)

        merchant = client.post(
            "/v1/admin/merchants", headers=admin, json={"lot_id": lot["id"], "name": "m"}
        )
        assert merchant.status_code == 201, merchant.text
        c.headers[MERCHANT] = {"Authorization": f"Bearer {merchant.json()['api_key']}"}

        c.headers[DRIVER] = _sign_in(client, admin, "13800000101")
        c.headers[OTHER_DRIVER] = _sign_in(client, admin, "13800000102")
        vehicle = add_verified_vehicle(client, c.headers[DRIVER], "苏E5R0L1")
        c.ids["vehicle_id"] = vehicle["id"]
        c.headers[ANONYMOUS] = {}
        yield c


def _path_for(template: str, caller: str, city: City) -> str:
    """Real ids where the caller's right to one resource is what is tested (another driver's
    vehicle); a made-up id elsewhere, so that no write changes what later calls rely on."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "vehicle_id" and caller == OTHER_DRIVER:
            return city.ids["vehicle_id"]
        if name == "district":
            return "rmtest"
        if name == "provider":
            return "sandbox"
        return PLACEHOLDER

    return re.sub(r"\{([^}]+)\}", fill, template)


def _operations(city: City) -> list[tuple[str, str]]:
    spec = city.client.get("/openapi.json").json()
    ops = [
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    ]
    # Writes that change a caller's own credentials go last.
    return sorted(ops, key=lambda op: (op[1].endswith("/key"), op[1], op[0]))


# Routes that end the caller's own tokens (and deletion, the account): drivers call them with
# a driver signed in for the purpose, so that later calls keep working.
ENDS_OWN_TOKENS = frozenset({("POST", "/v1/me/logout-all"), ("DELETE", "/v1/me")})
_throwaway_phones = itertools.count(13800000200)


def _call(city: City, method: str, path: str, caller: str) -> httpx.Response:
    body: Any = None if method in ("GET", "DELETE") else {}
    headers = city.headers.get(caller, {})
    if (method, path) in ENDS_OWN_TOKENS and caller in DRIVERS:
        headers = _sign_in(city.client, city.headers[ADMIN], str(next(_throwaway_phones)))
    return city.client.request(
        method,
        path,
        json=body,
        headers=headers,
        auth=city.auth.get(caller),
    )


def test_every_route_answers_each_caller_as_documented(city: City) -> None:
    operations = _operations(city)
    assert len(operations) > 60, "the OpenAPI lost its routes"
    wrong: list[str] = []
    for method, template in operations:
        allowed = expected(method, template)
        for caller in CALLERS:
            path = _path_for(template, caller, city)
            answer = _call(city, method, path, caller)
            refused = answer.status_code in (401, 403)
            if caller in allowed and refused:
                # A wrong sign-in code is an answer to an allowed caller, not a refusal.
                if answer.json().get("code") in ("otp_invalid", "otp_expired", "otp_unknown"):
                    continue
                wrong.append(f"{method} {template}: {caller} refused: {answer.text[:160]}")
            elif caller not in allowed and not refused:
                wrong.append(f"{method} {template}: {caller} let in ({answer.status_code})")
            assert answer.status_code < 500, f"{method} {path} as {caller}: {answer.text}"
    assert not wrong, "\n".join(wrong)


def test_another_drivers_vehicle_is_not_there(city: City) -> None:
    vehicle = city.ids["vehicle_id"]
    other = city.headers[OTHER_DRIVER]
    answers = [
        city.client.delete(f"/v1/me/vehicles/{vehicle}", headers=other),
        city.client.post(
            f"/v1/me/vehicles/{vehicle}/verification",
            headers=other,
            json={"owner_name": "x", "vin_last6": "123456"},
        ),
    ]
    assert [a.status_code for a in answers] == [404, 404], [a.text for a in answers]
    mine = city.client.get("/v1/me/vehicles", headers=city.headers[DRIVER]).json()
    assert [v["id"] for v in mine] == [vehicle]  # still there, untouched
    assert city.client.get("/v1/me/vehicles", headers=other).json() == []


def test_a_made_up_caller_is_refused_everywhere_it_claims_to_be_staff(city: City) -> None:
    forged = {"Authorization": f"Bearer {uuid.uuid4().hex}"}
    for method, template in _operations(city):
        if template.startswith("/v1/admin/"):
            answer = city.client.request(method, _path_for(template, ADMIN, city), headers=forged)
            assert answer.status_code == 401, f"{method} {template}: {answer.status_code}"


INTERNAL = [
    ("GET", "/internal/admin-tokens/revoked"),
    ("GET", "/internal/lots/keys/rm-1"),
    ("POST", "/internal/lots/prices"),
    ("GET", "/internal/lots/stats"),
    ("GET", "/internal/districts/figures"),
    ("GET", "/internal/billing/gate/accounts"),
    ("GET", f"/internal/billing/drivers/{PLACEHOLDER}/verified-windows"),
    ("GET", "/internal/billing/drivers/token-cutoffs"),
    ("GET", f"/internal/sessions/drivers/{PLACEHOLDER}/open"),
    ("GET", "/internal/billing/stats"),
    ("GET", "/internal/billing/parked"),
    ("GET", "/internal/sessions/gate/open"),
    ("GET", "/internal/sessions/stats"),
]


def test_internal_routes_refuse_every_outside_caller_even_with_the_internal_token(
    city: City,
) -> None:
    from shared.auth import internal_token

    rt = city.client.app.state.runtime  # type: ignore[attr-defined]
    leaked = {"x-citypark-internal": internal_token(rt.secret)}
    for method, path in INTERNAL:
        for caller in CALLERS:
            for extra in ({}, {"x-citypark-internal": uuid.uuid4().hex}, leaked):
                answer = city.client.request(
                    method,
                    path,
                    json=None if method == "GET" else {},
                    headers={**city.headers.get(caller, {}), **extra},
                    auth=city.auth.get(caller),
                )
                assert answer.status_code in (401, 403, 404), (
                    f"{method} {path} as {caller} with {sorted(extra)}: {answer.status_code}"
                )


def test_a_page_cursor_the_api_did_not_issue_is_refused_with_its_own_code(city: City) -> None:
    # (checked here for the driver's parkings; the staff lists have their own tests)
    answer = city.client.get(
        "/v1/me/sessions", params={"cursor": "not-a-cursor"}, headers=city.headers[DRIVER]
    )
    assert (answer.status_code, answer.json()["code"]) == (422, "cursor_invalid")
