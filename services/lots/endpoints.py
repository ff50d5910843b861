"""HTTP of the lots service: admin registry, public car-park search and quotes, internal API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from services.lots import service
from services.lots.models import District, Lot
from services.lots.schemas import (
    DistrictCreate,
    DistrictOut,
    HeartbeatIn,
    KeyOut,
    KeyResolution,
    Location,
    LotCreate,
    LotNearby,
    LotOut,
    OperatorCreate,
    OperatorOut,
    PriceOut,
    PublicKeyIn,
    QuoteOut,
    QuoteRequest,
    TariffUpdate,
    TariffVersionOut,
)
from shared.auth import AdminAuth, InternalAuth, ViewerAuth
from shared.deps import DbSession
from shared.errors import NotFound, PlateColorInvalid, PlateInvalid, TariffInvalid, ValidationFailed
from shared.http import problem_responses
from shared.signatures import PublicKeyInvalid

admin = APIRouter(prefix="/v1/admin", tags=["admin: registry"])
public = APIRouter(tags=["driver: car parks"])
internal = APIRouter(prefix="/internal/lots", include_in_schema=False)


def _lot_out(db: DbSession, lot: Lot) -> LotOut:
    return LotOut(
        id=lot.id,
        code=lot.code,
        name=lot.name,
        district=lot.district,
        operator_id=lot.operator_id,
        capacity=lot.capacity,
        location=Location(lat=lot.lat, lng=lot.lng),
        postpay_enabled=lot.postpay_enabled,
        free_spaces=lot.free_spaces,
        key_ids=service.lot_key_ids(db, lot.id),
        tariff=service.current_tariff_doc(db, lot.id),
        created_at=lot.created_at,
    )


def _district_out(db: DbSession, d: District) -> DistrictOut:
    return DistrictOut(
        code=d.code, name=d.name, dialect=d.dialect, key_ids=service.district_key_ids(db, d.code)
    )


@admin.post("/operators", status_code=status.HTTP_201_CREATED, response_model=OperatorOut)
def create_operator(data: OperatorCreate, db: DbSession, _: AdminAuth) -> OperatorOut:
    """Onboard a car-park operator, with its commission and settlement account."""
    op = service.create_operator(db, data)
    return OperatorOut.model_validate(op, from_attributes=True)


@admin.post(
    "/lots",
    status_code=status.HTTP_201_CREATED,
    response_model=LotOut,
    responses=problem_responses(
        service.DistrictUnknown,
        service.OperatorUnknown,
        service.LotCodeTaken,
        service.KeyIdTaken,
        TariffInvalid,
        PublicKeyInvalid,
    ),
)
def create_lot(data: LotCreate, db: DbSession, _: AdminAuth) -> LotOut:
    """Connect a car park: its district, operator, capacity, keys and tariff (in force now)."""
    return _lot_out(db, service.create_lot(db, data))


@admin.get("/lots/{lot_id}", response_model=LotOut, responses=problem_responses(service.LotUnknown))
def get_lot(lot_id: str, db: DbSession, _: ViewerAuth) -> LotOut:
    return _lot_out(db, service.get_lot(db, lot_id))


@admin.put(
    "/lots/{lot_id}/tariff",
    response_model=TariffVersionOut,
    responses=problem_responses(service.LotUnknown, TariffInvalid),
)
def put_tariff(lot_id: str, data: TariffUpdate, db: DbSession, _: AdminAuth) -> TariffVersionOut:
    """Add a tariff version; stays are priced by the version in force at their entry."""
    tariff = service.set_tariff(db, lot_id, data.effective_from, data.tariff)
    return TariffVersionOut(
        lot_id=lot_id, effective_from=data.effective_from, tariff=tariff.model_dump(mode="json")
    )


@admin.post(
    "/lots/{lot_id}/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyOut,
    responses=problem_responses(
        service.LotUnknown, service.KeyIdTaken, service.TooManyKeys, PublicKeyInvalid
    ),
)
def add_key(lot_id: str, key: PublicKeyIn, db: DbSession, _: AdminAuth) -> KeyOut:
    """Register a connector's public key (two may be active at once, for rotation)."""
    row = service.add_lot_key(db, lot_id, key)
    return KeyOut(key_id=row.key_id, created_at=row.created_at)


@admin.delete(
    "/lots/{lot_id}/keys/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(service.KeyUnknownHere),
)
def delete_key(lot_id: str, key_id: str, db: DbSession, _: AdminAuth) -> None:
    service.delete_lot_key(db, lot_id, key_id)


@admin.post(
    "/districts",
    status_code=status.HTTP_201_CREATED,
    response_model=DistrictOut,
    responses=problem_responses(service.DistrictExists, service.DialectUnknown),
)
def create_district(data: DistrictCreate, db: DbSession, _: AdminAuth) -> DistrictOut:
    """Add a district platform (districts are data: no code change needed)."""
    return _district_out(db, service.create_district(db, data))


@admin.post(
    "/districts/{code}/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyOut,
    responses=problem_responses(NotFound, service.KeyIdTaken, service.TooManyKeys),
)
def add_district_key(code: str, key: PublicKeyIn, db: DbSession, _: AdminAuth) -> KeyOut:
    row = service.add_district_key(db, code, key)
    return KeyOut(key_id=row.key_id, created_at=row.created_at)


def _parse_near(near: str) -> tuple[float, float]:
    try:
        lat_s, lng_s = near.split(",")
        lat, lng = float(lat_s), float(lng_s)
    except ValueError as exc:
        raise ValidationFailed("near must be 'lat,lng', e.g. 31.30,120.58") from exc
    if not (-90 <= lat <= 90 and -180 <= lng <= 180):
        raise ValidationFailed("near is outside valid coordinates")
    return lat, lng


@public.get("/v1/lots", response_model=list[LotNearby])
def lots_near(
    db: DbSession,
    near: Annotated[str, Query(examples=["31.3017,120.5853"])],
    radius_m: Annotated[int, Query(gt=0, le=50_000)] = 2000,
) -> list[LotNearby]:
    """Car parks near a point, nearest first, with free spaces and a tariff summary."""
    lat, lng = _parse_near(near)
    return [
        LotNearby(
            id=lot.id,
            code=lot.code,
            name=lot.name,
            district=lot.district,
            location=Location(lat=lot.lat, lng=lot.lng),
            distance_m=round(dist),
            capacity=lot.capacity,
            free_spaces=lot.free_spaces,
            postpay_enabled=lot.postpay_enabled,
            tariff_summary=service.tariff_summary(service.current_tariff_doc(db, lot.id)),
        )
        for lot, dist in service.lots_near(db, lat, lng, radius_m)
    ]


@public.post(
    "/v1/quotes",
    response_model=QuoteOut,
    responses=problem_responses(service.LotUnknown, PlateColorInvalid, PlateInvalid),
)
def create_quote(data: QuoteRequest, db: DbSession) -> QuoteOut:
    """What a stay costs at a car park, with one breakdown line per stretch (SPEC §8)."""
    _, fee, breakdown = service.price(
        db, data.lot_id, data.entered_at, data.exited_at, data.vehicle_type, data.plate_color
    )
    return QuoteOut(lot_id=data.lot_id, fee_fen=fee, breakdown=breakdown)


@internal.get("/keys/{key_id}", response_model=KeyResolution)
def resolve_key(key_id: str, db: DbSession, _: InternalAuth) -> KeyResolution:
    return service.resolve_key(db, key_id)


@internal.post("/{lot_id}/price", response_model=PriceOut)
def price(lot_id: str, data: QuoteRequest, db: DbSession, _: InternalAuth) -> PriceOut:
    lot, fee, breakdown = service.price(
        db, lot_id, data.entered_at, data.exited_at, data.vehicle_type, data.plate_color
    )
    return PriceOut(lot_id=lot.id, operator_id=lot.operator_id, fee_fen=fee, breakdown=breakdown)


@internal.post("/{lot_id}/heartbeat", status_code=status.HTTP_204_NO_CONTENT)
def heartbeat(lot_id: str, beat: HeartbeatIn, db: DbSession, _: InternalAuth) -> None:
    service.record_heartbeat(db, lot_id, beat)


@internal.get("/stats")
def stats(db: DbSession, _: InternalAuth) -> dict[str, int]:
    return service.stats(db)
