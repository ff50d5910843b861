"""Admission control for the connector API: when the city cannot keep up, it says so at once.

A gateway process works on at most `connector_max_in_flight` connector requests at a time. One
more is answered 429 `city_busy` with `Retry-After` before its body is read or its signature
checked (both cost CPU the city does not have right then); the SDK waits that long and sends
again from its outbox, so nothing is lost, and an exit is decided offline within its deadline.
Without this, requests queue for a worker thread until the car park's own timeout fires, and
the city then does work nobody waits for any more.
"""

from __future__ import annotations

import structlog
from prometheus_client import Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.http import problem_response

PREFIX = "/v1/connector/"
RETRY_AFTER_S = 1

log = structlog.get_logger(__name__)
SHED = Counter("citypark_connector_shed_total", "Connector requests pushed back (city busy)")


class Admission:
    """ASGI middleware; the counter lives on the event loop, so it needs no lock."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            SHED.inc()
            log.info("connector.city_busy", path=scope["path"], in_flight=self.in_flight)
            response = problem_response(
                429,
                "city_busy",
                "The city is busy",
                f"Too many requests in progress; send it again after {RETRY_AFTER_S} s "
                "(nothing of this request was recorded).",
                retry_after_s=RETRY_AFTER_S,
            )
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
