"""A vehicle registry to test against: it holds plates with their owner and VIN, and answers
whether a claimed owner and VIN ending match, never who the owner is.

Owner names compare normalised (NFKC folds full-width to half-width, then trimmed, inner
spaces collapsed, case-folded); VINs compare case-insensitively. Registering a plate again
replaces its record, as a change of ownership does.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from services.vehicleregistry import auth
from services.vehicleregistry.models import RegisteredVehicle
from shared.deps import DbSession, ReadDbSession
from shared.errors import PlateColorInvalid, PlateInvalid, problem
from shared.http import problem_responses
from shared.plates import normalize_plate, parse_plate_color
from shared.timeutil import utcnow

router = APIRouter(
    prefix="/v1",
    tags=["vehicle registry sandbox"],
    dependencies=[Depends(auth.require_caller)],
    responses=problem_responses(auth.RegistryTokenInvalid),
)

VinInvalid = problem(422, "vin_invalid", "A VIN is 17 letters and digits")
OwnerNameInvalid = problem(422, "owner_name_invalid", "The owner name is empty")
VIN_RE = re.compile(r"^[0-9A-Z]{17}$")


def normalize_name(raw: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", raw).split()).casefold()


def normalize_vin(raw: str) -> str:
    return unicodedata.normalize("NFKC", raw).strip().upper()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VehicleIn(Strict):
    plate: str = Field(max_length=32, examples=["苏E·12345"])
    plate_color: str = Field(max_length=16, examples=["blue"])
    owner_name: str = Field(min_length=1, max_length=100, examples=["张三"])
    vin: str = Field(min_length=17, max_length=40, examples=["LSVAU2180N2123456"])


class VehicleOut(BaseModel):
    plate: str
    plate_color: str
    owner_name: str
    vin: str
    registered_at: datetime


class VerificationIn(Strict):
    plate: str = Field(max_length=32, examples=["苏E12345"])
    plate_color: str = Field(max_length=16, examples=["blue"])
    owner_name: str = Field(max_length=100, examples=["张三"])
    vin_last6: str = Field(max_length=12, examples=["123456"])


class VerificationOut(BaseModel):
    match: bool


@router.post(
    "/vehicles",
    status_code=status.HTTP_201_CREATED,
    response_model=VehicleOut,
    responses=problem_responses(PlateInvalid, PlateColorInvalid, VinInvalid, OwnerNameInvalid),
)
def register(data: VehicleIn, db: DbSession) -> VehicleOut:
    """Put a vehicle on the register (or change its owner)."""
    plate = normalize_plate(data.plate)
    color = parse_plate_color(data.plate_color).value
    vin = normalize_vin(data.vin)
    if not VIN_RE.match(vin):
        raise VinInvalid(f"{data.vin!r} is not 17 letters and digits")
    owner = " ".join(unicodedata.normalize("NFKC", data.owner_name).split())
    if not owner:
        raise OwnerNameInvalid()
    record = db.scalar(
        select(RegisteredVehicle).where(
            RegisteredVehicle.plate == plate, RegisteredVehicle.plate_color == color
        )
    )
    if record is None:
        record = RegisteredVehicle(plate=plate, plate_color=color, owner_name=owner, vin=vin)
        db.add(record)
    else:
        record.owner_name, record.vin, record.registered_at = owner, vin, utcnow()
    db.flush()
    return VehicleOut.model_validate(record, from_attributes=True)


@router.post(
    "/verifications",
    response_model=VerificationOut,
    responses=problem_responses(PlateInvalid, PlateColorInvalid),
)
def verify(data: VerificationIn, db: ReadDbSession) -> VerificationOut:
    """Does the register hold the plate with this owner and a VIN ending in `vin_last6`?
    An unknown plate is simply no match. Only reads (a POST so that names stay out of URLs
    and logs)."""
    plate = normalize_plate(data.plate)
    color = parse_plate_color(data.plate_color).value
    record = db.scalar(
        select(RegisteredVehicle).where(
            RegisteredVehicle.plate == plate, RegisteredVehicle.plate_color == color
        )
    )
    last6 = normalize_vin(data.vin_last6)
    match = (
        record is not None
        and len(last6) == 6
        and record.vin.endswith(last6)
        and normalize_name(record.owner_name) == normalize_name(data.owner_name)
    )
    return VerificationOut(match=match)
