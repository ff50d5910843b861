"""The OpenAPI document tells the truth: schemathesis fuzzes every documented operation of the
embedded city with all of its checks, as an admin and as a driver.

Each answer must be documented (status, content type, body schema, headers), every request the
schema allows must be accepted (no 400/422), every request it forbids must be rejected, no 5xx,
and an undocumented method answers 405 with `Allow`. The run is deterministic and bounded for
CI; `CITYPARK_FUZZ_EXAMPLES=200` runs it longer locally.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, settings
from schemathesis.python import asgi
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    is_unexpected_http_status_case,
    positive_data_acceptance,
)

from services.gateway.tokens import service as admin_tokens
from services.lots.schemas import EXAMPLE_TARIFF
from shared.auth import Role
from shared.db import transaction
from tests.embedded_city import embedded_city, onboard_lot

EXAMPLES = int(os.environ.get("CITYPARK_FUZZ_EXAMPLES", "10"))
# Refusals that mean "this does not match the schema": a schema-valid request never gets one.
SHAPE_CODES = {"validation_failed", "json_invalid", "bad_request"}


class InProcess:
    """The city's app for schemathesis without a second lifespan: the embedded city's own test
    client already runs the workers, and two sets of them would fight over the same log."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db: Path = tmp_path_factory.mktemp("openapi-fuzz") / "city.db"
    with embedded_city(db, raise_server_exceptions=False) as tc:
        yield tc
    asgi.shutdown_lifespans()


@pytest.fixture(scope="module")
def tokens(city: TestClient) -> dict[str, str]:
    rt = city.app.state.runtime  # type: ignore[attr-defined]
    with transaction(rt.sessionmaker) as db:
        admin = admin_tokens.create(db, rt.secret, Role.admin)
    # A real driver, signed in as drivers are, so driver routes find who is asking.
    phone = "13800000099"
    assert city.post("/v1/auth/otp", json={"phone": phone}).status_code == 202
    sms = city.get(
        "/v1/admin/sandbox/sms",
        params={"phone": phone},
        headers={"Authorization": f"Bearer {admin}"},
    ).json()
    code = re.search(r"\d{6}", sms[0]["body"]).group(0)  # type: ignore[union-attr]
    signed_in = city.post("/v1/auth/token", json={"phone": phone, "code": code})
    assert signed_in.status_code == 200, signed_in.text
    return {"admin": admin, "driver": signed_in.json()["access_token"]}


def as_caller(city: TestClient, token: str) -> BaseSchema:
    """The city's schema, every request carrying `token` except those that leave the
    credentials out on purpose (schemathesis checks that they are refused)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", InProcess(city.app))

    class Bearer:
        def get(self, case: schemathesis.Case, ctx: Any) -> str:
            return token

        def set(self, case: schemathesis.Case, data: str, ctx: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    schema.auth(refresh_interval=None)(Bearer)
    return schema


@pytest.fixture(scope="module")
def admin_api(city: TestClient, tokens: dict[str, str]) -> BaseSchema:
    return as_caller(city, tokens["admin"])


@pytest.fixture(scope="module")
def driver_api(city: TestClient, tokens: dict[str, str]) -> BaseSchema:
    return as_caller(city, tokens["driver"])


@pytest.fixture(autouse=True)
def _node_id(request: pytest.FixtureRequest) -> None:
    # schemathesis 4 names each operation's subtest through `_nodeid`, which pytest 9.2 dropped.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@pytest.fixture(scope="module")
def documented(city: TestClient) -> dict[tuple[str, str], dict[str, Any]]:
    paths = city.get("/openapi.json").json()["paths"]
    return {(m.upper(), p): op["responses"] for p, ops in paths.items() for m, op in ops.items()}


def refused_only_for_documented_reasons(
    documented: dict[tuple[str, str], dict[str, Any]],
) -> Any:
    """schemathesis's `positive_data_acceptance`, with the rules JSON Schema cannot state.

    Some refusals of a well-formed request are the API's rules, not its shape: an operator id
    that does not exist, a page cursor this API did not issue, a stay longer than a year, an
    unmasked look-up without a reason. Such a request may be refused with 422, but only with a
    problem `code` that the operation documents for that status; a shape code
    (`validation_failed` …) means a constraint is missing from the schema, and fails."""

    def check(ctx: Any, response: Any, case: schemathesis.Case) -> bool | None:
        meta = case.meta
        if meta is None or not meta.generation.mode.is_positive:
            return None
        if is_unexpected_http_status_case(case) or response.status_code not in (400, 422):
            return None
        code = response.json().get("code", "")
        said = documented[(case.method.upper(), case.operation.path)]
        description = said.get(str(response.status_code), {}).get("description", "")
        refused = f"A schema-valid request was refused with {response.status_code} `{code}` "
        refused += f"({response.json().get('detail')})"
        assert code not in SHAPE_CODES, f"{refused}: a constraint is missing from the schema"
        assert f"`{code}`" in description, f"{refused}; documented only: {description!r}"
        return None

    return check


def call_and_validate(case: schemathesis.Case, documented: dict[tuple[str, str], Any]) -> None:
    case.call_and_validate(
        # Replaced by the stricter-where-it-can check above, never simply dropped.
        excluded_checks=[positive_data_acceptance],
        additional_checks=[refused_only_for_documented_reasons(documented)],
    )


bounded = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # the same requests on every run: CI must not depend on luck
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
    # No shrinking: a failure is reported as found, and a failing run stays as short as a green one.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


@schemathesis.pytest.from_fixture("admin_api").parametrize()
@bounded
def test_as_an_admin_the_city_answers_as_its_openapi_says(
    case: schemathesis.Case, documented: dict[tuple[str, str], Any]
) -> None:
    call_and_validate(case, documented)


@schemathesis.pytest.from_fixture("driver_api").parametrize()
@bounded
def test_as_a_driver_the_city_answers_as_its_openapi_says(
    case: schemathesis.Case, documented: dict[tuple[str, str], Any]
) -> None:
    call_and_validate(case, documented)


def test_a_null_for_a_field_that_cannot_be_null_is_a_422_and_changes_nothing(
    city: TestClient, tokens: dict[str, str]
) -> None:
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    lot, _ = onboard_lot(city, admin, code="NULL-1", district="gusu", tariff=EXAMPLE_TARIFF)
    for body in ({"capacity": None, "location": None}, {"name": None}, {"postpay_enabled": 0}):
        answer = city.patch(f"/v1/admin/lots/{lot['id']}", headers=admin, json=body)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert answer.json()["code"] == "validation_failed"
    again = city.get(f"/v1/admin/lots/{lot['id']}", headers=admin).json()
    assert (again["capacity"], again["location"], again["name"]) == (
        lot["capacity"],
        lot["location"],
        lot["name"],
    )
    # Left out is still "unchanged".
    moved = city.patch(f"/v1/admin/lots/{lot['id']}", headers=admin, json={"capacity": 60})
    assert (moved.status_code, moved.json()["capacity"]) == (200, 60)
