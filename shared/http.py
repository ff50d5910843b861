"""FastAPI plumbing shared by every service: problem+json rendering, request ids, health."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import structlog
from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute, iter_route_contexts
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from shared import workqueue
from shared.errors import PROBLEM_BASE, PROBLEM_CONTENT_TYPE, Problem

log = structlog.get_logger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_failed",
    429: "rate_limited",
}


def problem_response(status: int, code: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {
        "type": PROBLEM_BASE + code.replace("_", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_CONTENT_TYPE)


PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
# RFC 9457 with the stable `code` every CityPark problem carries; extra members are allowed.
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
    "additionalProperties": True,
}


def _problem_content() -> dict[str, Any]:
    return {PROBLEM_CONTENT_TYPE: {"schema": dict(PROBLEM_REF)}}


def problem_responses(*problems: type[Problem]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for the domain errors an endpoint can raise."""
    out: dict[int | str, dict[str, Any]] = {}
    for p in problems:
        entry = out.setdefault(p.status, {"description": "", "content": _problem_content()})
        entry["description"] = ", ".join(filter(None, [entry["description"], f"`{p.code}`"]))
    return out


F = TypeVar("F", bound=Callable[..., Any])


def answers(*problems: type[Problem]) -> Callable[[F], F]:
    """Marks a dependency with the problems it can raise; every route that uses it documents
    them (see `document_problems`), so a guard is described once, where it is written."""

    def mark(func: F) -> F:
        func.__problems__ = problems  # type: ignore[attr-defined]
        return func

    return mark


# Statuses any route can answer, whatever it does: the shared handlers and middlewares below.
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before sending the same request again",
        "schema": {"type": "integer", "minimum": 0},
    }
}
_GENERIC: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("`bad_request`: the body cannot be read at all (not UTF-8, cut short)", {}),
    404: ("`not_found`: nothing is routed here or the resource does not exist", {}),
    405: (
        "`method_not_allowed`: another method of this path; `Allow` lists them",
        {"Allow": {"required": True, "schema": {"type": "string"}}},
    ),
    413: ("`body_too_large`: the request body is over the limit", {}),
    422: ("`validation_failed`, `json_invalid`: the request does not match this schema", {}),
    429: ("`city_busy`, `rate_limited`: come back after `Retry-After`", _RETRY_AFTER),
    503: (
        "`dependency_unavailable`, `database_unavailable`: come back after `Retry-After`",
        _RETRY_AFTER,
    ),
}
_AUTH: dict[int, str] = {
    401: "`unauthorized`: the credentials are missing, invalid, expired or revoked",
    403: "`forbidden`: the credentials are valid but not for this operation",
}
# Dependencies recognised as guards without a mark: the bearer tokens of shared.auth and the
# callers of the connector, the sandbox, quotes and merchants.
_GUARD_PREFIXES = ("authenticate", "verify_signature", "require_")
_GUARD_SUFFIXES = ("_caller",)
BEARER_SCHEME = "bearer"


def _dependencies(dependant: Dependant) -> Iterator[Dependant]:
    for sub in dependant.dependencies:
        yield sub
        yield from _dependencies(sub)


def _guards(route: Any) -> tuple[bool, bool, list[type[Problem]]]:
    """(guarded, by a bearer token, problems the route's dependencies declare)."""
    guarded = bearer = False
    problems: list[type[Problem]] = []
    for dep in _dependencies(route.dependant):
        call = dep.call
        name = getattr(call, "__name__", "")
        problems += getattr(call, "__problems__", ())
        if name.startswith(_GUARD_PREFIXES) or name.endswith(_GUARD_SUFFIXES):
            guarded = True
            bearer = bearer or name in ("authenticate_driver", "authenticate_admin")
    guarded = guarded or any(p.status in (401, 403) for p in problems)
    return guarded, bearer, problems


def _add(responses: dict[str, Any], status: int, description: str, headers: dict[str, Any]) -> None:
    entry = responses.setdefault(str(status), {"description": ""})
    known = entry.get("description", "")
    if known in ("", "Validation Error"):  # FastAPI's own words for its 422
        entry["description"] = description
    elif description not in known:
        entry["description"] = f"{known}; {description}"
    entry["content"] = _problem_content()
    if headers:
        entry.setdefault("headers", {}).update(headers)


def document_problems(schema: dict[str, Any], routes: list[Any]) -> dict[str, Any]:
    """Makes an OpenAPI document say every answer its operations can give.

    Problems are `application/problem+json` with the Problem schema (FastAPI's default 422 is
    plain JSON), and each operation gains the statuses the shared machinery answers: 401/403
    where a guard runs, 404 where a path has parameters, 405 with `Allow`, 413/422 where a
    request has a body or parameters, 429 and 503 everywhere."""
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    components["schemas"].pop("HTTPValidationError", None)
    components["schemas"].pop("ValidationError", None)
    by_operation: dict[tuple[str, str], Any] = {}
    for route in iter_route_contexts(routes):  # FastAPI keeps included routers unflattened
        if isinstance(route.original_route, APIRoute) and route.include_in_schema:
            for method in route.methods or ():
                by_operation[(str(route.path_format), method.lower())] = route
    bearer_used = False
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses: dict[str, Any] = operation["responses"]
            route = by_operation.get((path, method))
            guarded, bearer, declared = _guards(route) if route else (False, False, [])
            for problem_class in declared:
                _add(responses, problem_class.status, f"`{problem_class.code}`", {})
            if guarded:
                for status, description in _AUTH.items():
                    _add(responses, status, description, {})
            if bearer:
                bearer_used = True
                operation.setdefault("security", [{BEARER_SCHEME: []}])
            parameters = operation.get("parameters", [])
            for status, (description, headers) in _GENERIC.items():
                if status == 404 and not any(p.get("in") == "path" for p in parameters):
                    continue
                if status in (400, 413) and "requestBody" not in operation:
                    continue
                if status == 422 and not (parameters or "requestBody" in operation):
                    continue
                _add(responses, status, description, headers)
            for status, entry in responses.items():
                if status[:1] in ("4", "5"):
                    entry["content"] = _problem_content()
            operation["responses"] = dict(sorted(responses.items()))
    if bearer_used:
        components.setdefault("securitySchemes", {})[BEARER_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "A driver's token (`/v1/auth/token`) or a city ops token",
        }
    return schema


def install_truthful_openapi(app: FastAPI) -> None:
    """The app's `/openapi.json` passes through `document_problems` once."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if not getattr(app.state, "openapi_documented", False):
            app.openapi_schema = document_problems(build(), app.routes)
            app.state.openapi_documented = True
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of this path answers (one path may have several routes)."""
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.router.routes):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:  # PARTIAL: the path matches, the method does not
            methods |= set(route.methods or ())
    return sorted(methods)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        response = JSONResponse(
            exc.to_dict(instance=request.url.path),
            status_code=exc.status,
            media_type=PROBLEM_CONTENT_TYPE,
        )
        # A problem that says when to come back (`retry_after_s`) says it in the header too.
        retry_after = exc.extra.get("retry_after_s")
        if isinstance(retry_after, int) and retry_after > 0:
            response.headers["Retry-After"] = str(retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        code = (
            "json_invalid"
            if any(e["type"] == "json_invalid" for e in errors)
            else ("validation_failed")
        )
        first = errors[0] if errors else {"loc": [], "msg": "invalid"}
        detail = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        return problem_response(422, code, "The request is invalid", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        response = problem_response(exc.status_code, code, str(exc.detail), str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            # RFC 9110: a 405 lists what the resource does support, over all its routes.
            response.headers["Allow"] = ", ".join(allowed_methods(request))
        return response

    @app.exception_handler(OperationalError)
    async def _database_away(request: Request, exc: OperationalError) -> JSONResponse:
        # Transient by nature: the write lock is busy (SQLite) or the database is away for a
        # moment. The client is told to come back, and nothing of the request was kept.
        busy = "database is locked" in str(exc.orig)
        status, code = (429, "city_busy") if busy else (503, "database_unavailable")
        if busy:
            log.warning("http.city_busy", path=request.url.path, waited_for="write lock")
        else:
            log.warning(
                "http.database_unavailable", path=request.url.path, error=str(exc.orig)[:200]
            )
        response = problem_response(
            status,
            code,
            "The city is busy" if busy else "The database is unavailable",
            "Nothing was recorded; send the same request again after `Retry-After` seconds.",
        )
        response.headers["Retry-After"] = "1" if busy else "2"
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if workqueue.classify(exc) is workqueue.Failure.transient:
            # Redis, the broker or a neighbour away for a moment: come back, not a bug.
            log.warning("http.dependency_unavailable", path=request.url.path, error=repr(exc)[:200])
            response = problem_response(
                503,
                "dependency_unavailable",
                "A dependency is unavailable",
                "Send the same request again (same event id or Idempotency-Key) after "
                "`Retry-After` seconds; it is applied once.",
            )
            response.headers["Retry-After"] = "2"
            return response
        # A bug; the client sees a problem, never a stack trace.
        log.exception("http.unhandled", path=request.url.path)
        return problem_response(
            500,
            "internal_error",
            "Internal error",
            "An unexpected error occurred; it has been logged.",
        )


class RequestIds:
    """Every request gets an id (the caller's `X-Request-Id`, or a new one) bound to its log
    lines and sent back. Pure ASGI: a `BaseHTTPMiddleware` runs each request in a task group of
    its own, which can outlive a client that went away and keep a test client from stopping."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = given.decode("latin-1") if given else uuid.uuid4().hex

        async def with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        structlog.contextvars.bind_contextvars(request_id=rid)
        try:
            await self.app(scope, receive, with_id)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")


def install_request_ids(app: FastAPI) -> None:
    app.add_middleware(RequestIds)


def make_app(title: str, description: str, *, version: str = "0.1.0") -> FastAPI:
    app = FastAPI(title=title, description=description, version=version)
    install_problem_handlers(app)
    install_truthful_openapi(app)
    install_request_ids(app)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """This process's Prometheus metrics (retries, dead letters, parked work …)."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
