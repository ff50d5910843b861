"""Adapter for the payment sandbox service (`citypark run paysandbox`) over HTTP."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import time
from datetime import date, datetime
from typing import Any

import httpx

from services.billing.provider.port import (
    Agreement,
    ChargeResult,
    Outcome,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RefundResult,
    StatementLine,
)

SIGNATURE_MAX_SKEW_S = 300


class SandboxProvider:
    name = "sandbox"

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 3.0,
        transport: httpx.BaseTransport | None = None,
        notify_url: str | None = None,
        notify_secret: str | None = None,
        token: str | None = None,
    ) -> None:
        # Outside sandbox mode the sandbox answers only callers with this bearer token.
        headers = {"authorization": f"Bearer {token}"} if token else None
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout, transport=transport, headers=headers
        )
        self.notify_url = notify_url
        self.notify_secret = notify_secret

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
    def _rejected(response: httpx.Response) -> ProviderRejected:
        try:
            body = response.json()
            code, detail = str(body.get("code", "provider_rejected")), str(body.get("detail"))
        except ValueError:
            code, detail = "provider_rejected", response.text[:200]
        return ProviderRejected(code, detail)

    @staticmethod
    def _result(body: dict[str, Any]) -> ChargeResult:
        captured_at = body.get("captured_at")
        return ChargeResult(
            outcome=Outcome.captured if body["status"] == "captured" else Outcome.declined,
            trade_no=body.get("trade_no"),
            failure_code=body.get("failure_code"),
            captured_at=datetime.fromisoformat(captured_at) if captured_at else None,
        )

    @staticmethod
    def _refund(body: dict[str, Any]) -> RefundResult:
        return RefundResult(
            out_refund_no=body["out_refund_no"],
            amount_fen=int(body["amount_fen"]),
            refunded_at=datetime.fromisoformat(body["refunded_at"]),
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
                "notify_url": self.notify_url,
            },
        )
        if response.status_code == 404:
            # The agreement is gone at the provider: a decline, the driver must rebind.
            return ChargeResult(Outcome.declined, None, "agreement_unknown", None)
        if response.status_code >= 400 and response.status_code != 402:
            raise self._rejected(response)
        return self._result(response.json())

    def query(self, out_trade_no: str) -> ChargeResult | None:
        response = self._send("GET", f"/v1/charges/{out_trade_no}")
        if response.status_code == 404:
            return None
        return self._result(response.json())

    def refund(self, *, out_trade_no: str, out_refund_no: str, amount_fen: int) -> RefundResult:
        response = self._send(
            "POST",
            "/v1/refunds",
            json={
                "out_trade_no": out_trade_no,
                "out_refund_no": out_refund_no,
                "amount_fen": amount_fen,
                "notify_url": self.notify_url,
            },
        )
        if response.status_code >= 400:
            raise self._rejected(response)
        return self._refund(response.json())

    def query_refund(self, out_refund_no: str) -> RefundResult | None:
        response = self._send("GET", f"/v1/refunds/{out_refund_no}")
        if response.status_code == 404:
            return None
        return self._refund(response.json())

    def statement(self, day: date) -> list[StatementLine]:
        response = self._send("GET", f"/v1/statements/{day.isoformat()}")
        if response.status_code >= 400:
            raise self._rejected(response)
        return [
            StatementLine(
                kind=row["kind"],
                out_trade_no=row["out_trade_no"],
                out_refund_no=row["out_refund_no"] or None,
                amount_fen=int(row["amount_fen"]),
            )
            for row in csv.DictReader(io.StringIO(response.text))
        ]

    def verify_notification(self, body: bytes, signature: str | None) -> bool:
        """`t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, at most 300 s old."""
        if not signature or not self.notify_secret:
            return False
        parts = dict(p.split("=", 1) for p in signature.split(",") if "=" in p)
        try:
            t = int(parts.get("t", ""))
        except ValueError:
            return False
        if abs(time.time() - t) > SIGNATURE_MAX_SKEW_S:
            return False
        expected = hmac.new(
            self.notify_secret.encode(), f"{t}.".encode() + body, hashlib.sha256
        ).hexdigest()
        return hmac.compare_digest(expected, parts.get("v1", ""))
