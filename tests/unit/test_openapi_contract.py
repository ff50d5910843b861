"""The OpenAPI document of every app says what the shared machinery answers."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from fastapi import APIRouter, Depends, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from shared.auth import DriverAuth
from shared.errors import PROBLEM_CONTENT_TYPE, NotFound, Unauthorized, problem
from shared.http import answers, make_app, problem_responses
from shared.wire import Instant, IsoDate, JsonInt

Gone = problem(410, "gone_for_good", "Gone")


@answers(Unauthorized)
def merchant_key(request: Request) -> str:
    return request.headers.get("x-key", "")


class Body(BaseModel):
    n: JsonInt
    flag: bool = Field(default=False, strict=True)
    day: IsoDate
    at: Instant


def app() -> TestClient:
    router = APIRouter()

    @router.get("/things/{thing_id}", responses=problem_responses(NotFound))
    def get_thing(thing_id: str, driver: DriverAuth) -> dict[str, str]:
        return {"id": thing_id}

    @router.post("/things")
    def add_thing(body: Body, key: Annotated[str, Depends(merchant_key)]) -> dict[str, str]:
        return {}

    @router.delete("/things/{thing_id}", responses=problem_responses(Gone))
    def drop_thing(thing_id: str) -> None:
        return None

    @router.get("/open")
    def open_() -> dict[str, str]:
        return {}

    service = make_app("t", "t")
    service.include_router(router)
    return TestClient(service)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return app().get("/openapi.json").json()  # type: ignore[no-any-return]


def test_every_problem_is_problem_json_with_the_problem_schema(doc: dict[str, Any]) -> None:
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert list(response["content"]) == [PROBLEM_CONTENT_TYPE], (path, method)
                    schema = response["content"][PROBLEM_CONTENT_TYPE]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Problem"}
    assert "code" in doc["components"]["schemas"]["Problem"]["required"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_statuses_follow_what_an_operation_has(doc: dict[str, Any]) -> None:
    get = doc["paths"]["/things/{thing_id}"]["get"]["responses"]
    post = doc["paths"]["/things"]["post"]["responses"]
    delete = doc["paths"]["/things/{thing_id}"]["delete"]["responses"]
    plain = doc["paths"]["/open"]["get"]["responses"]
    # A bearer guard: 401/403 and the security scheme; a path parameter: 404.
    assert {"401", "403", "404", "405", "422", "429", "503"} <= set(get)
    assert "`not_found`" in get["404"]["description"]
    assert doc["paths"]["/things/{thing_id}"]["get"]["security"] == [{"bearer": []}]
    # A marked dependency documents what it declares; a body: 400, 413, 422.
    assert {"400", "401", "403", "413", "422"} <= set(post)
    assert "security" not in doc["paths"]["/things"]["post"]
    assert "`gone_for_good`" in delete["410"]["description"]
    assert not {"401", "403", "400", "413"} & set(delete)
    # Nothing to validate, nothing guarded: what every route can answer, and no more.
    assert set(plain) == {"200", "405", "429", "503"}
    assert plain["405"]["headers"]["Allow"]["required"] is True
    assert "Retry-After" in plain["429"]["headers"]


def test_a_405_lists_every_method_of_the_path_in_allow() -> None:
    client = app()
    answer = client.put("/things/7")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "DELETE, GET"
    assert answer.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE)
    assert answer.json()["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    "body",
    [
        {"n": "1", "day": "2026-01-31", "at": "2026-01-31T08:00:00+08:00"},
        {"n": True, "day": "2026-01-31", "at": "2026-01-31T08:00:00+08:00"},
        {"n": 1.5, "day": "2026-01-31", "at": "2026-01-31T08:00:00+08:00"},
        {"n": 1, "flag": 0, "day": "2026-01-31", "at": "2026-01-31T08:00:00+08:00"},
        {"n": 1, "day": 0, "at": "2026-01-31T08:00:00+08:00"},
        {"n": 1, "day": "2026-01-31T00:00:00", "at": "2026-01-31T08:00:00+08:00"},
        {"n": 1, "day": "2026-01-31", "at": 1769817600},
        {"n": 1, "day": "2026-01-31", "at": "2026-01-31"},
    ],
)
def test_values_of_another_json_type_are_refused(body: dict[str, Any]) -> None:
    answer = app().post("/things", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["code"] == "validation_failed"


def test_the_written_forms_are_read() -> None:
    body = {"n": 1, "day": "2026-01-31", "at": "2026-01-31T08:00:00+08:00"}
    assert app().post("/things", json=body).status_code == 200
    # JSON Schema's integer includes 600.0, and so do we.
    assert app().post("/things", json={**body, "n": 600.0, "flag": True}).status_code == 200
