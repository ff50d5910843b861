"""Internal HTTP of passes: the gateway writes what lots push and asks for the gate decision;
billing asks for a driver's passes. Public access is through the gateway and billing."""

from __future__ import annotations

from fastapi import APIRouter, status

from services.lots import passes
from services.lots.passes import CoverIn, CoverOut, DriverPassOut, LotPasses, PassOut, PassPut
from shared.auth import InternalAuth
from shared.deps import DbSession, ReadDbSession

internal = APIRouter(prefix="/internal/lots", include_in_schema=False)


@internal.post("/passes/by-vehicles", response_model=list[DriverPassOut])
def by_vehicles(data: passes.VehiclesIn, db: ReadDbSession, _: InternalAuth) -> list[DriverPassOut]:
    return passes.passes_of_vehicles(db, data.vehicles)


@internal.get("/{lot_id}/passes", response_model=LotPasses)
def lot_passes(lot_id: str, db: DbSession, _: InternalAuth) -> LotPasses:
    return passes.lot_passes(db, lot_id)


@internal.post("/{lot_id}/passes/cover", response_model=CoverOut)
def cover(lot_id: str, data: CoverIn, db: DbSession, _: InternalAuth) -> CoverOut:
    kind = passes.covering_kind(
        db, lot_id, data.plate, data.plate_color, data.entered_at, data.exited_at
    )
    return CoverOut(covered=kind is not None, reason=kind)


@internal.put("/{lot_id}/passes/{pass_id}", response_model=PassOut)
def put_pass(lot_id: str, pass_id: str, data: PassPut, db: DbSession, _: InternalAuth) -> PassOut:
    return passes.put_pass(db, lot_id, pass_id, data)


@internal.delete("/{lot_id}/passes/{pass_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_pass(lot_id: str, pass_id: str, db: DbSession, _: InternalAuth) -> None:
    passes.delete_pass(db, lot_id, pass_id)
