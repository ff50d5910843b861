"""Every endpoint answers bad input with a 4xx problem carrying a `code` — never a 500.

Random JSON bodies, random path parameters and random query strings are thrown at every route
of the embedded city (as anonymous, driver and admin callers)."""

from __future__ import annotations

import string
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.gateway.tokens import service as admin_tokens
from shared.auth import Role, issue_driver_token
from shared.db import transaction
from tests.embedded_city import embedded_city

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=12,
)
# Bodies that look like ours: right field names, wrong or odd values.
FIELDS = [
    "plate",
    "plate_color",
    "event_id",
    "occurred_at",
    "phone",
    "code",
    "lot_id",
    "entered_at",
    "exited_at",
    "tariff",
    "name",
    "district",
    "operator_id",
    "capacity",
    "location",
    "public_keys",
    "key_id",
    "public_key_pem",
    "provider",
    "agreement_no",
    "effective_from",
    "dialect",
    "commission_bps",
    "settlement_account",
    "events",
    "free_spaces",
    "total_spaces",
    "vehicle_type",
    "lane",
    "holder",
    "balance_fen",
]
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8) | json_values
segments = st.text(alphabet=string.ascii_letters + string.digits + "-_.%~", min_size=1, max_size=20)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("fuzz") / "city.db"
    with embedded_city(db, raise_server_exceptions=False) as tc:
        yield tc


def routes(client: TestClient) -> list[tuple[str, str]]:
    """Every documented operation (the public API)."""
    paths = client.get("/openapi.json").json()["paths"]
    return [(method.upper(), path) for path, ops in paths.items() for method in ops]


def test_random_input_never_causes_a_server_error(client: TestClient) -> None:
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    with transaction(rt.sessionmaker) as db:
        admin = admin_tokens.create(db, rt.secret, Role.admin)
    driver = issue_driver_token(rt.secret, "no-such-driver", 600)
    callers = [{}, {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {driver}"}]
    every = routes(client)
    assert len(every) > 20  # the check must see the API, not an empty app

    @settings(
        max_examples=200,
        deadline=None,
        derandomize=True,  # the same inputs on every run: CI must not depend on luck
        suppress_health_check=list(HealthCheck),
    )
    @given(
        route=st.sampled_from(every),
        body=bodies,
        caller=st.sampled_from(callers),
        params=st.lists(segments, min_size=4, max_size=4),
        query=st.dictionaries(
            st.sampled_from(
                ["near", "radius_m", "status", "cursor", "limit", "phone", "days", "plate"]
            ),
            segments,
            max_size=3,
        ),
    )
    def check(
        route: tuple[str, str],
        body: Any,
        caller: dict[str, str],
        params: list[str],
        query: dict[str, str],
    ) -> None:
        method, path = route
        for i, name in enumerate(p for p in path.split("/") if p.startswith("{")):
            path = path.replace(name, params[i % len(params)])
        answer = client.request(
            method,
            path,
            headers=caller,
            params=query,
            json=body if method in ("POST", "PUT", "PATCH") else None,
        )
        assert answer.status_code < 500, (method, path, body, answer.text)
        if answer.status_code >= 400:
            assert answer.headers["content-type"].startswith("application/problem+json"), path
            assert answer.json()["code"], path

    check()
