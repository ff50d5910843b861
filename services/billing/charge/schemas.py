from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from services.billing.refund.schemas import DisputeOut


class ChargeOut(BaseModel):
    id: str
    session_id: str
    lot_id: str
    lot_code: str
    plate: str
    entered_at: datetime
    exited_at: datetime
    amount_fen: int
    refunded_fen: int = 0
    validated_fen: int = 0  # merchants' validations; `breakdown.validations` lists them
    status: str
    failure_code: str | None
    captured_at: datetime | None
    breakdown: dict[str, Any]
    created_at: datetime


class ChargeDetail(ChargeOut):
    """One charge with its disputes and their outcome (refund or rejection)."""

    disputes: list[DisputeOut] = []


class ArrearsOut(BaseModel):
    arrears_fen: int
    charges: list[ChargeOut]


class LedgerCheck(BaseModel):
    balanced: bool
    sum_fen: int
    journals: int
    unbalanced_journals: list[str]


class DriverArrears(BaseModel):
    driver_id: str
    phone: str
    postpay: str | None
    arrears_fen: int
    charges: int
    oldest_exited_at: datetime
