"""Adapter for the payment sandbox service (`citypark run paysandbox`) over HTTP."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx

from services.billing.provider.port import (
    Agreement,
    ChargeResult,
    Outcome,
    ProviderTimeout,
    ProviderUnavailable,
)


class SandboxProvider:
    name = "sandbox"

    def __init__(
        self, base_url: str, *, timeout: float = 3.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout, transport=transport
        )

    def _send(self, method: str, path: str, json: Any = None) -> httpx.Response:
        try:
            response = self.http.request(method, path, json=json)
        except httpx.TimeoutException as exc:
            raise ProviderTimeout(f"{method} {path}: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise ProviderUnavailable(f"{method} {path}: {exc!r}") from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise ProviderUnavailable(f"{method} {path} answered {response.status_code}")
        return response

    @staticmethod
    def _result(body: dict[str, Any]) -> ChargeResult:
        captured_at = body.get("captured_at")
        return ChargeResult(
            outcome=Outcome.captured if body["status"] == "captured" else Outcome.declined,
            trade_no=body.get("trade_no"),
            failure_code=body.get("failure_code"),
            captured_at=datetime.fromisoformat(captured_at) if captured_at else None,
        )

    def get_agreement(self, agreement_no: str) -> Agreement | None:
        response = self._send("GET", f"/v1/agreements/{agreement_no}")
        if response.status_code == 404:
            return None
        body = response.json()
        return Agreement(
            agreement_no=body["agreement_no"],
            holder=body["holder"],
            masked_account=body["masked_account"],
            active=body["status"] == "active",
        )

    def charge(
        self, *, agreement_no: str, out_trade_no: str, amount_fen: int, description: str
    ) -> ChargeResult:
        response = self._send(
            "POST",
            "/v1/charges",
            json={
                "agreement_no": agreement_no,
                "out_trade_no": out_trade_no,
                "amount_fen": amount_fen,
                "description": description,
            },
        )
        if response.status_code >= 400 and response.status_code != 402:
            raise ProviderUnavailable(f"charge refused: {response.status_code} {response.text}")
        return self._result(response.json())

    def query(self, out_trade_no: str) -> ChargeResult | None:
        response = self._send("GET", f"/v1/charges/{out_trade_no}")
        if response.status_code == 404:
            return None
        return self._result(response.json())
