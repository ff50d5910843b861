from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from services.billing.vehicle.schemas import VehicleOut


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountBind(Strict):
    provider: str = Field(examples=["sandbox"])
    agreement_no: str = Field(min_length=1, max_length=100, examples=["AGR-7f3c0d2e"])


class AccountOut(BaseModel):
    provider: str
    masked_account: str
    bound_at: datetime


class MeOut(BaseModel):
    id: str
    phone: str
    account: AccountOut | None
    vehicles: list[VehicleOut]
    postpay: str
    arrears_fen: int
