from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountBind(Strict):
    provider: str = Field(examples=["sandbox"])
    agreement_no: str = Field(min_length=1, max_length=100, examples=["AGR-7f3c0d2e"])


class AccountOut(BaseModel):
    provider: str
    masked_account: str
    bound_at: datetime


class VehicleIn(Strict):
    plate: str = Field(examples=["苏E·12345"])
    plate_color: str = Field(examples=["blue"])


class VehicleOut(BaseModel):
    id: str
    plate: str
    plate_color: str
    created_at: datetime


class MeOut(BaseModel):
    id: str
    phone: str
    account: AccountOut | None
    vehicles: list[VehicleOut]
    postpay: str
    arrears_fen: int
