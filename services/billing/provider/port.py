"""The payment-provider port: everything billing needs from a withholding provider."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Protocol


class ProviderTimeout(Exception):
    """No answer in time: the outcome is unknown until queried."""


class ProviderUnavailable(Exception):
    """A transient refusal (5xx, connection refused): nothing happened; safe to retry."""


class ProviderRejected(Exception):
    """A definitive refusal of the request itself (e.g. a refund above what was captured)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


class Outcome(StrEnum):
    captured = "captured"
    declined = "declined"


@dataclass(frozen=True)
class ChargeResult:
    outcome: Outcome
    trade_no: str | None
    failure_code: str | None
    captured_at: datetime | None


@dataclass(frozen=True)
class RefundResult:
    out_refund_no: str
    amount_fen: int
    refunded_at: datetime


@dataclass(frozen=True)
class StatementLine:
    kind: str  # charge | refund
    out_trade_no: str
    out_refund_no: str | None
    amount_fen: int


@dataclass(frozen=True)
class Agreement:
    agreement_no: str
    holder: str
    masked_account: str
    active: bool


class PaymentProvider(Protocol):
    name: str

    def get_agreement(self, agreement_no: str) -> Agreement | None: ...

    def charge(
        self, *, agreement_no: str, out_trade_no: str, amount_fen: int, description: str
    ) -> ChargeResult: ...

    def query(self, out_trade_no: str) -> ChargeResult | None:
        """The outcome of an earlier charge request, or None if the provider never saw it."""

    def refund(self, *, out_trade_no: str, out_refund_no: str, amount_fen: int) -> RefundResult:
        """Refund part of a captured charge; idempotent on `out_refund_no`."""

    def query_refund(self, out_refund_no: str) -> RefundResult | None: ...

    def statement(self, day: date) -> list[StatementLine]:
        """Every capture and refund of one Asia/Shanghai day, as the provider booked it."""

    def verify_notification(self, body: bytes, signature: str | None) -> bool: ...
