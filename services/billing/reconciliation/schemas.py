from __future__ import annotations

from datetime import date as Date  # `date` is also a field name of the contract
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from shared.wire import IsoDate


class ReconciliationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    date: IsoDate
    provider: str = "sandbox"


class Resolution(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str = Field(min_length=1, max_length=1000)


class Item(BaseModel):
    kind: str  # charge | refund
    ref: str  # out_trade_no of a charge, out_refund_no of a refund
    out_trade_no: str
    amount_fen: int


class Mismatch(BaseModel):
    kind: str
    ref: str
    out_trade_no: str
    ours_fen: int
    theirs_fen: int


class ReconciliationOut(BaseModel):
    id: str
    date: Date
    provider: str
    matched: int
    missing_ours: list[Item]
    missing_theirs: list[Item]
    amount_mismatch: list[Mismatch]
    status: str
    resolution: str | None
    created_at: datetime
