"""The payment-provider port: everything billing needs from a withholding provider."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol


class ProviderTimeout(Exception):
    """No answer in time: the charge's outcome is unknown until queried."""


class ProviderUnavailable(Exception):
    """A transient refusal (5xx, connection refused): nothing happened; safe to retry."""


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
