from __future__ import annotations

from datetime import date as Date  # `date` is also a field name of the contract

from pydantic import BaseModel, ConfigDict


class SettlementRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    date: Date


class OperatorSettlement(BaseModel):
    operator_id: str
    captured_fen: int
    refunded_fen: int
    commission_fen: int
    payable_fen: int


class SettlementDay(BaseModel):
    date: Date
    settlements: list[OperatorSettlement]
