"""`Idempotency-Key` on driver and admin writes: a repeat answers the first result.

Answers are kept in Redis for a day, scoped by the caller's credentials, method and path.
A key reused with a different body is refused (422 `idempotency_key_reused`); while the first
request is still running, a repeat gets 409 `idempotency_in_progress`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from shared.errors import PROBLEM_BASE, PROBLEM_CONTENT_TYPE

TTL_S = 24 * 3600
WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def _problem(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse(
        {
            "type": PROBLEM_BASE + code.replace("_", "-"),
            "title": detail,
            "status": status,
            "detail": detail,
            "code": code,
        },
        status_code=status,
        media_type=PROBLEM_CONTENT_TYPE,
    )


def install(app: FastAPI) -> None:
    @app.middleware("http")
    async def idempotency(request: Request, call_next: Any) -> Response:
        key = request.headers.get("idempotency-key")
        if (
            not key or request.method not in WRITES or request.url.path.startswith("/v1/connector")
        ):  # connectors use event_id
            return await call_next(request)  # type: ignore[no-any-return]
        if len(key) > 200:
            return _problem(422, "idempotency_key_invalid", "Idempotency-Key is too long")
        body = await request.body()
        who = hashlib.sha256(request.headers.get("authorization", "").encode()).hexdigest()
        scope = hashlib.sha256(f"{who}|{request.method}|{request.url.path}|{key}".encode())
        slot = f"citypark:idem:{scope.hexdigest()}"
        fingerprint = hashlib.sha256(body).hexdigest()
        r = request.app.state.runtime.redis
        claimed = r.set(
            slot, json.dumps({"state": "running", "fp": fingerprint}), nx=True, ex=TTL_S
        )
        if not claimed:
            seen = json.loads(r.get(slot) or "{}")
            if seen.get("fp") != fingerprint:
                return _problem(
                    422,
                    "idempotency_key_reused",
                    "This Idempotency-Key was used with another request body",
                )
            if seen.get("state") != "done":
                return _problem(
                    409,
                    "idempotency_in_progress",
                    "The first request with this key is still running",
                )
            return Response(
                seen["body"].encode(),
                status_code=seen["status"],
                media_type=seen["media_type"],
                headers={"Idempotent-Replayed": "true"},
            )
        response = await call_next(request)
        chunks = [chunk async for chunk in response.body_iterator]
        content = b"".join(chunks)
        if response.status_code >= 500:
            r.delete(slot)  # nothing was done for sure: let the client retry for real
        else:
            r.set(
                slot,
                json.dumps(
                    {
                        "state": "done",
                        "fp": fingerprint,
                        "status": response.status_code,
                        "media_type": response.media_type
                        or response.headers.get("content-type", "application/json"),
                        "body": content.decode("utf-8", "replace"),
                    }
                ),
                ex=TTL_S,
            )
        return Response(
            content,
            status_code=response.status_code,
            headers=dict(response.headers),
            media_type=response.media_type,
        )
