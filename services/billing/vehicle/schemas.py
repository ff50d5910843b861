from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.billing.vehicle.models import VehicleStatus


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VehicleIn(Strict):
    plate: str = Field(max_length=32, examples=["苏E·12345"])
    plate_color: str = Field(max_length=16, examples=["blue"])


class VerificationIn(Strict):
    """What the registration certificate (行驶证) says: checked against the vehicle registry."""

    owner_name: str = Field(min_length=1, max_length=100, examples=["张三"])
    vin_last6: str = Field(
        min_length=6, max_length=6, pattern=r"^[0-9A-Za-z]{6}$", examples=["A12345"]
    )


class VehicleOut(BaseModel):
    id: str
    plate: str
    plate_color: str
    # `unverified` until the registry proves ownership: the gate then answers pay_on_site
    # (`vehicle_unverified`) and no parking of the plate is shown. `superseded`: another
    # driver proved ownership later and holds the plate now.
    status: VehicleStatus
    verified_at: datetime | None
    created_at: datetime


class PassWindowOut(BaseModel):
    start: str
    end: str


class DriverPassOut(BaseModel):
    """A pass a car park holds for one of the driver's vehicles (the lots service owns it)."""

    pass_id: str
    lot_id: str
    lot_code: str
    lot_name: str
    plate: str
    plate_color: str
    kind: Literal["monthly", "whitelist"]
    valid_from: datetime
    valid_to: datetime
    window: PassWindowOut | None
    time_zone: str
    state: Literal["active", "upcoming", "expired"]


class VerifiedWindow(BaseModel):
    """When a driver held a plate verified: parkings entering in [verified_at, until) are
    theirs to see (`until` null: still held). For the sessions service."""

    plate: str
    plate_color: str
    verified_at: datetime
    until: datetime | None
