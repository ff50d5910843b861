"""FastAPI plumbing shared by every service: problem+json rendering, request ids, health."""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def problem_responses(*problems: type[Problem]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for the domain errors an endpoint can raise."""
    out: dict[int | str, dict[str, Any]] = {}
    for p in problems:
        entry = out.setdefault(p.status, {"description": "", "content": {PROBLEM_CONTENT_TYPE: {}}})
        entry["description"] = ", ".join(filter(None, [entry["description"], f"`{p.code}`"]))
    return out


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
        return problem_response(exc.status_code, code, str(exc.detail), str(exc.detail))

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


def install_request_ids(app: FastAPI) -> None:
    @app.middleware("http")
    async def _request_id(request: Request, call_next: Any) -> Any:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=rid)
        try:
            response = await call_next(request)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
        response.headers["X-Request-Id"] = rid
        return response


def make_app(title: str, description: str, *, version: str = "0.1.0") -> FastAPI:
    app = FastAPI(title=title, description=description, version=version)
    install_problem_handlers(app)
    install_request_ids(app)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """This process's Prometheus metrics (retries, dead letters, parked work …)."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
