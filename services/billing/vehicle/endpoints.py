"""HTTP of drivers' vehicles: claim a plate, prove ownership, list, remove; the passes car
parks hold for proven vehicles; and, for the sessions service, when each plate was proven."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from services.billing.vehicle import service as vehicles
from services.billing.vehicle.registry import VehicleRegistry
from services.billing.vehicle.schemas import (
    DriverPassOut,
    VehicleIn,
    VehicleOut,
    VerificationIn,
    VerifiedWindow,
)
from shared.auth import DriverAuth, InternalAuth
from shared.deps import DbSession
from shared.errors import (
    NotFound,
    PlateColorInvalid,
    PlateInvalid,
    RateLimited,
    UpstreamUnavailable,
)
from shared.http import problem_responses
from shared.plates import mask_plate
from shared.settings import Settings

me = APIRouter(prefix="/v1/me", tags=["driver: vehicles"])
internal = APIRouter(prefix="/internal/billing/drivers", include_in_schema=False)


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _registry(request: Request) -> VehicleRegistry:
    return request.app.state.runtime.vehicle_registry  # type: ignore[no-any-return]


@me.post(
    "/vehicles",
    status_code=status.HTTP_201_CREATED,
    response_model=VehicleOut,
    responses=problem_responses(
        PlateInvalid, PlateColorInvalid, vehicles.VehicleExists, vehicles.VehicleClaimsExceeded
    ),
)
def add_vehicle(data: VehicleIn, who: DriverAuth, db: DbSession, request: Request) -> VehicleOut:
    """Claim a plate; it stays `unverified` (no post-pay, no parkings shown) until ownership
    is proven with `POST /v1/me/vehicles/{id}/verification`. Another driver's claim does not
    block it."""
    v = vehicles.add_vehicle(db, _settings(request), who.id, data.plate, data.plate_color)
    return VehicleOut.model_validate(v, from_attributes=True)


@me.post(
    "/vehicles/{vehicle_id}/verification",
    response_model=VehicleOut,
    responses=problem_responses(
        NotFound, vehicles.VerificationFailed, RateLimited, vehicles.RegistryDown
    ),
)
def verify_vehicle(
    vehicle_id: str, data: VerificationIn, who: DriverAuth, db: DbSession, request: Request
) -> VehicleOut:
    """Prove ownership with the owner's name and the VIN's last 6 characters as the
    registration certificate shows them; the vehicle registry checks them. A verified vehicle
    takes the plate over from a driver who held it before (they are notified)."""
    v = vehicles.verify_vehicle(
        db,
        _settings(request),
        _registry(request),
        request.app.state.runtime.redis,
        who.id,
        vehicle_id,
        data.owner_name,
        data.vin_last6,
    )
    return VehicleOut.model_validate(v, from_attributes=True)


@me.get("/vehicles", response_model=list[VehicleOut])
def list_vehicles(who: DriverAuth, db: DbSession) -> list[VehicleOut]:
    return [
        VehicleOut.model_validate(v, from_attributes=True) for v in vehicles.vehicles_of(db, who.id)
    ]


@me.delete(
    "/vehicles/{vehicle_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(NotFound),
)
def remove_vehicle(vehicle_id: str, who: DriverAuth, db: DbSession, request: Request) -> Response:
    vehicles.remove_vehicle(db, _settings(request), who.id, vehicle_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@me.get(
    "/passes",
    response_model=list[DriverPassOut],
    responses=problem_responses(UpstreamUnavailable),
)
def list_passes(who: DriverAuth, db: DbSession, request: Request) -> list[DriverPassOut]:
    """Monthly passes and whitelist entries car parks hold for the driver's verified
    vehicles, newest validity first (expired ones for 90 days). Plates are shown masked."""
    mine = [
        {"plate": v.plate, "plate_color": v.plate_color} for v in vehicles.verified_of(db, who.id)
    ]
    if not mine:
        return []
    lots = request.app.state.runtime.internal("lots")
    found = lots.call("POST", "/internal/lots/passes/by-vehicles", json={"vehicles": mine})
    passes = [DriverPassOut.model_validate(p) for p in found]
    for p in passes:
        p.plate = mask_plate(p.plate)
    return passes


@internal.get("/{driver_id}/verified-windows", response_model=list[VerifiedWindow])
def verified_windows(driver_id: str, _: InternalAuth, db: DbSession) -> list[VerifiedWindow]:
    """When the driver held each plate verified (the sessions service shows only the
    parkings that entered inside these windows)."""
    return vehicles.verified_windows(db, driver_id)
