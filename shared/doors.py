"""What every public app puts at its door: bounded request bodies and no internal headers.

`BodyLimit` counts the bytes of a request body as they are received and answers 413
`body_too_large` (problem+json) as soon as they pass the limit of the route, before anything
parses the body or checks its signature: an unsigned chunked gigabyte costs the city no more
than the limit, whatever `Content-Length` says or does not say.

`InternalDoor` removes the headers only services may send each other (`x-citypark-internal`)
from every request that does not carry the process's own door token: a caller outside the
process can never present them, even if it learnt the internal token.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import problem
from shared.http import problem_response

GENERAL_MAX_BODY_BYTES = 1 << 20
# Headers only the city's own processes may set (the internal token, the gateway's proof of
# the forwarded address): never taken from outside.
INTERNAL_HEADERS = frozenset({b"x-citypark-internal", b"x-citypark-forwarded"})
DOOR_HEADER = "x-citypark-door"


# For the OpenAPI of routes behind `BodyLimit` (the middleware answers it, not the route).
BodyTooLarge = problem(413, "body_too_large", "The request body is too large")


class _TooLarge(Exception):
    """Raised into the app from `receive` to stop it reading further."""


def too_large_response(limit: int) -> object:
    return problem_response(
        413,
        "body_too_large",
        BodyTooLarge.title,
        f"At most {limit} bytes are accepted here; nothing of this request was recorded.",
        max_body_bytes=limit,
    )


class BodyLimit:
    """Pure ASGI middleware: `limit_for(path)` bytes at most per request body."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length":
                announced = value.decode("latin-1").strip()
                if not announced.isdigit() or int(announced) > limit:
                    await too_large_response(limit)(scope, receive, send)  # type: ignore[operator]
                    return
        received = 0
        exceeded = False
        started = False

        async def counted() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise _TooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            # Whatever the app makes of the interrupted read (a 400, a 500) is not sent:
            # the caller gets the 413 below.
            if exceeded and not started:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except _TooLarge:
            pass
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await too_large_response(limit)(scope, receive, send)  # type: ignore[operator]


def new_door_token() -> str:
    return secrets.token_urlsafe(32)


class InternalDoor:
    """Pure ASGI middleware: internal headers pass only with this process's door token.

    The embedded city serves its `/internal` routes on the public port (its services call
    each other there); its own internal clients add the door token, nobody else knows it."""

    def __init__(self, app: ASGIApp, token: str | None = None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = scope["headers"]
            door = next((v for k, v in headers if k == DOOR_HEADER.encode()), None)
            own = (
                self.token is not None
                and door is not None
                and hmac.compare_digest(door, self.token)
            )
            kept = [
                (k, v)
                for k, v in headers
                if k != DOOR_HEADER.encode() and (own or k not in INTERNAL_HEADERS)
            ]
            if len(kept) != len(headers):
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


def strip_internal(headers: dict[str, str]) -> dict[str, str]:
    """Outside headers without those that grant internal access (for a forwarding proxy)."""
    internal = {h.decode() for h in INTERNAL_HEADERS} | {DOOR_HEADER}
    return {k: v for k, v in headers.items() if k.lower() not in internal}


# Percent-escapes of `/`, `\\`, `.` and `%` itself (double encoding) never belong in a route.
_SMUGGLED = re.compile(rb"%(2[fFeE5]|5[cC])")


def path_is_clean(raw_path: bytes) -> bool:
    """A request path as sent (still percent-encoded) that names what it seems to name: no
    `.`/`..` segment, no backslash, no encoded separator, dot or percent, no control bytes.
    What passes means the same before and after any decoding or normalisation downstream."""
    if not raw_path.startswith(b"/") or b"\\" in raw_path or _SMUGGLED.search(raw_path):
        return False
    decoded = unquote_to_bytes(raw_path)
    if any(b < 0x20 or b == 0x7F for b in decoded):
        return False
    return not any(seg in (b".", b"..") for seg in decoded.split(b"/"))
