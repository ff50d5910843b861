"""Internal API of the districts: what the gateway needs to read a district's body (its
dialect, its car parks by code) and the district figures for ops."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from services.lots.districts import figures
from services.lots.models import District, Lot
from shared.auth import InternalAuth
from shared.deps import DbSession
from shared.errors import NotFound
from shared.runtime import Runtime

internal = APIRouter(prefix="/internal/districts", include_in_schema=False)


class DistrictInfo(BaseModel):
    code: str
    name: str
    dialect: str


class LotCodes(BaseModel):
    codes: list[str] = Field(max_length=2000)


class LotRef(BaseModel):
    id: str
    code: str
    district: str
    operator_id: str
    postpay_enabled: bool


@internal.get("/figures")
def district_figures(request: Request, db: DbSession, _: InternalAuth) -> list[dict[str, Any]]:
    """Per district: events per minute, rejects by reason, consumer lag, last event time."""
    rt: Runtime = request.app.state.runtime
    codes = db.scalars(select(District.code).order_by(District.code))
    return [figures.read(rt.redis, code) for code in codes]


@internal.get("/{code}", response_model=DistrictInfo)
def get_district(code: str, db: DbSession, _: InternalAuth) -> DistrictInfo:
    district = db.get(District, code)
    if district is None:
        raise NotFound(f"No district {code!r}")
    return DistrictInfo(code=district.code, name=district.name, dialect=district.dialect)


@internal.post("/lots/resolve", response_model=dict[str, LotRef])
def resolve_lots(data: LotCodes, db: DbSession, _: InternalAuth) -> dict[str, LotRef]:
    """Car parks by code, whatever their district (the caller tells foreign ones apart)."""
    rows = db.scalars(select(Lot).where(Lot.code.in_(set(data.codes))))
    return {
        lot.code: LotRef(
            id=lot.id,
            code=lot.code,
            district=lot.district,
            operator_id=lot.operator_id,
            postpay_enabled=lot.postpay_enabled,
        )
        for lot in rows
    }
