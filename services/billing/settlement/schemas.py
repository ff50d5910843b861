from __future__ import annotations

from datetime import date as Date  # `date` is also a field name of the contract
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.wire import IsoDate


class SettlementRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    date: IsoDate


class Adjustment(BaseModel):
    """Money of an earlier day that was booked after that day had been settled."""

    date: Date = Field(description="The Asia/Shanghai day the money belongs to")
    kind: Literal["capture", "refund"]
    reference: str = Field(description="The charge's id (a capture) or the refund's id")
    captured_fen: int
    refunded_fen: int
    commission_fen: int
    payable_fen: int


class OperatorSettlement(BaseModel):
    operator_id: str
    # The settled day's own money: captured − refunded − commission = payable.
    captured_fen: int
    refunded_fen: int
    commission_fen: int
    payable_fen: int
    adjustments: list[Adjustment] = []
    adjustments_fen: int = Field(0, description="The payable of the adjustments together")
    payout_fen: int = Field(description="What the operator is paid: payable + adjustments")


class SettlementDay(BaseModel):
    date: Date
    settlements: list[OperatorSettlement]
