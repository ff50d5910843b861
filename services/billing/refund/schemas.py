from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DisputeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=1000, examples=["I left after 20 minutes"])


class DisputeDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    outcome: Literal["refund", "reject"]
    # Refund only; omitted: everything not yet refunded.
    amount_fen: int | None = Field(default=None, gt=0)


class RefundOut(BaseModel):
    id: str
    charge_id: str
    amount_fen: int
    status: str
    failure_code: str | None
    refunded_at: datetime | None


class DisputeOut(BaseModel):
    id: str
    charge_id: str
    status: str
    reason: str
    outcome: str | None
    amount_fen: int | None
    refund: RefundOut | None = None
    decided_at: datetime | None
    created_at: datetime
