"""Synchronous calls between services (small internal HTTP APIs), retried on transient errors."""

from __future__ import annotations

from typing import Any

import httpx
from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from shared.auth import internal_token
from shared.errors import NotFound, UpstreamRejected, UpstreamUnavailable


class InternalClient:
    def __init__(
        self,
        base_url: str,
        secret: str,
        *,
        timeout: float = 5.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            headers={"x-citypark-internal": internal_token(secret)},
            transport=transport,
        )

    @retry(
        retry=retry_if_exception_type(httpx.TransportError),
        stop=stop_after_attempt(3),
        wait=wait_exponential_jitter(max=1.0, jitter=0.1),
        reraise=True,
    )
    def _send(self, method: str, path: str, json: Any = None) -> httpx.Response:
        return self.http.request(method, path, json=json)

    def call(self, method: str, path: str, json: Any = None) -> Any:
        try:
            response = self._send(method, path, json)
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"{self.http.base_url} unreachable: {exc!r}") from exc
        if response.status_code == 404:
            raise NotFound(response.json().get("detail", "not found"))
        if response.status_code >= 500 or response.status_code in (408, 425, 429):
            # Down, overloaded or pushing back: all of it passes; the caller retries.
            raise UpstreamUnavailable(f"{method} {path} answered {response.status_code}")
        if response.status_code >= 400:
            # A 4xx from a neighbour is a contract breach on our side: surface it as is.
            raise UpstreamRejected(
                f"{method} {path} answered {response.status_code}: {response.text[:200]}"
            )
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def close(self) -> None:
        self.http.close()
