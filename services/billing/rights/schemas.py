from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhoneChange(Strict):
    phone: str = Field(description="The new number.", examples=["13912345678"])


class PhoneConfirm(Strict):
    phone: str = Field(description="The new number, as asked for.", examples=["13912345678"])
    code_old: str = Field(min_length=4, max_length=8, description="The code sent to the old one.")
    code_new: str = Field(min_length=4, max_length=8, description="The code sent to the new one.")


class PhoneOut(BaseModel):
    phone: str = Field(description="The driver's number now, masked.")


Row = dict[str, Any]


class DriverExport(BaseModel):
    """Everything the city holds about the driver. Plates and the phone are the driver's own
    and shown in full; the payment account as the driver sees it (masked); a webhook's signing
    secret is never stored, so never exported."""

    exported_at: datetime
    profile: Row
    payment_account: Row | None
    vehicles: list[Row] = Field(description="Every claim, with its verification history.")
    parkings: list[Row] = Field(description="Parkings while the driver held the vehicle verified.")
    charges: list[Row]
    refunds: list[Row]
    disputes: list[Row]
    invoices: list[Row]
    notifications: list[Row]
    notification_preferences: Row | None
    webhook: Row | None
    passes: list[Row]
