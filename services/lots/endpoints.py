"""HTTP of the lots service: admin registry, public car-park search and quotes, internal API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import redis
from fastapi import APIRouter, Depends, Query, Request, status

from services.lots import audit, occupancy, passes, quote_auth, service
from services.lots.models import District, Lot, LotKey, Occupancy, Operator, TariffVersion
from services.lots.schemas import (
    AuditEntryOut,
    AuditPage,
    DistrictCreate,
    DistrictOut,
    HeartbeatIn,
    KeyOut,
    KeyResolution,
    Location,
    LotCreate,
    LotNearby,
    LotOut,
    LotPage,
    LotsStats,
    LotSummary,
    LotUpdate,
    OperatorCreate,
    OperatorOut,
    OperatorPage,
    PriceItemOut,
    PriceOut,
    PricesIn,
    PricesOut,
    PublicKeyIn,
    QuoteOut,
    QuoteRequest,
    TariffUpdate,
    TariffVersionOut,
)
from shared.auth import AdminAuth, InternalAuth, ViewerAuth
from shared.deps import DbSession, ReadDbSession
from shared.errors import (
    NotFound,
    PlateColorInvalid,
    PlateInvalid,
    Problem,
    TariffInvalid,
    UpstreamUnavailable,
    ValidationFailed,
)
from shared.http import problem_responses
from shared.masking import UNMASK_RESPONSES, View, open_lookup, staff_view
from shared.settings import Settings
from shared.signatures import PublicKeyInvalid
from shared.tariff import QuoteInputInvalid
from shared.timeutil import utcnow
from shared.wire import Instant

admin = APIRouter(prefix="/v1/admin", tags=["admin: registry"])
public = APIRouter(tags=["driver: car parks"])
internal = APIRouter(prefix="/internal/lots", include_in_schema=False)


def _redis(request: Request) -> redis.Redis:
    return request.app.state.runtime.redis  # type: ignore[no-any-return]


Cache = Annotated[redis.Redis, Depends(_redis)]
Limit = Annotated[int, Query(ge=1, le=200)]
# `lat,lng` in decimal degrees within what the map indexes (±85° of latitude, ±180° of longitude).
NEAR_PATTERN = (
    r"^-?(85(\.0+)?|8[0-4](\.[0-9]+)?|[1-7]?[0-9](\.[0-9]+)?),"
    r"-?(180(\.0+)?|1[0-7][0-9](\.[0-9]+)?|[1-9]?[0-9](\.[0-9]+)?)$"
)
# Staff reads: bank accounts for finance and admin only; the audit log's snapshots masked.
OperatorView = Annotated[View, Depends(staff_view("lots", "operator", record=audit.record_entry))]
AuditView = Annotated[View, Depends(staff_view("lots", "audit", record=audit.record_entry))]


def _operator_out(op: Operator, view: View) -> OperatorOut:
    out = OperatorOut.model_validate(op, from_attributes=True)
    out.settlement_account = view.account(out.settlement_account)
    return out


def _audit_out(entry: audit.AuditEntry, view: View, settings: Settings) -> AuditEntryOut:
    out = AuditEntryOut.model_validate(entry, from_attributes=True)
    after = open_lookup(settings, out.after, unmasked=view.unmasked)
    out.before, out.after = view.doc(out.before), view.doc(after)
    return out


def _lot_out(db: DbSession, lot: Lot) -> LotOut:
    occ = db.get(Occupancy, lot.id)
    now = utcnow()
    return LotOut(
        id=lot.id,
        code=lot.code,
        name=lot.name,
        district=lot.district,
        operator_id=lot.operator_id,
        capacity=lot.capacity,
        location=Location(lat=lot.lat, lng=lot.lng),
        postpay_enabled=lot.postpay_enabled,
        free_spaces=max(lot.capacity - occ.occupied, 0) if occ else lot.free_spaces,
        online=occupancy.is_online(occ.heartbeat_at if occ else None, now),
        last_heartbeat_at=occ.heartbeat_at if occ else None,
        key_ids=service.lot_key_ids(db, lot.id),
        tariff=service.current_tariff_doc(db, lot.id),
        created_at=lot.created_at,
    )


def _key_out(key: LotKey) -> KeyOut:
    return KeyOut(
        key_id=key.key_id,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
        active=key.revoked_at is None,
    )


def _version_out(version: TariffVersion, in_force_id: str | None) -> TariffVersionOut:
    return TariffVersionOut(
        id=version.id,
        lot_id=version.lot_id,
        effective_from=version.effective_from,
        in_force=version.id == in_force_id,
        created_at=version.created_at,
        tariff=version.document,
    )


def _district_out(db: DbSession, d: District) -> DistrictOut:
    return DistrictOut(
        code=d.code, name=d.name, dialect=d.dialect, key_ids=service.district_key_ids(db, d.code)
    )


@admin.post("/operators", status_code=status.HTTP_201_CREATED, response_model=OperatorOut)
def create_operator(data: OperatorCreate, db: DbSession, who: AdminAuth) -> OperatorOut:
    """Onboard a car-park operator, with its commission and settlement account."""
    op = service.create_operator(db, data, who)
    return OperatorOut.model_validate(op, from_attributes=True)


@admin.get(
    "/operators",
    response_model=OperatorPage,
    responses={**problem_responses(service.CursorInvalid), **UNMASK_RESPONSES},
)
def list_operators(
    db: DbSession,
    view: OperatorView,
    q: Annotated[str | None, Query(max_length=200, description="Part of the name")] = None,
    cursor: str | None = None,
    limit: Limit = 50,
) -> OperatorPage:
    """Operators by name; `next_cursor` pages on. `settlement_account` is masked for viewers."""
    page, nxt = service.list_operators(db, q=q, cursor=cursor, limit=limit)
    return OperatorPage(
        items=[_operator_out(op, view) for op in page],
        next_cursor=nxt,
    )


@admin.get(
    "/operators/{operator_id}",
    response_model=OperatorOut,
    responses={**problem_responses(service.OperatorNotFound), **UNMASK_RESPONSES},
)
def get_operator(operator_id: str, db: DbSession, view: OperatorView) -> OperatorOut:
    """One operator; `settlement_account` is masked for viewers."""
    return _operator_out(service.get_operator(db, operator_id), view)


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
        UpstreamUnavailable,
    ),
)
def create_lot(data: LotCreate, db: DbSession, r: Cache, who: AdminAuth) -> LotOut:
    """Connect a car park: its district, operator, capacity, keys and tariff (in force now)."""
    return _lot_out(db, service.create_lot(db, data, who, cache=r))


@admin.get("/lots", response_model=LotPage, responses=problem_responses(service.CursorInvalid))
def list_lots(
    db: DbSession,
    _: ViewerAuth,
    district: str | None = None,
    operator_id: str | None = None,
    q: Annotated[str | None, Query(max_length=200, description="Part of code or name")] = None,
    cursor: str | None = None,
    limit: Limit = 50,
) -> LotPage:
    """Search the registry (by district, operator, code or name), ordered by code."""
    page, nxt = service.list_lots(
        db, district=district, operator_id=operator_id, q=q, cursor=cursor, limit=limit
    )
    now = utcnow()
    return LotPage(
        items=[
            LotSummary(
                id=lot.id,
                code=lot.code,
                name=lot.name,
                district=lot.district,
                operator_id=lot.operator_id,
                capacity=lot.capacity,
                location=Location(lat=lot.lat, lng=lot.lng),
                postpay_enabled=lot.postpay_enabled,
                free_spaces=max(lot.capacity - (occ.occupied if occ else 0), 0),
                online=occupancy.is_online(occ.heartbeat_at if occ else None, now),
                created_at=lot.created_at,
            )
            for lot, occ in page
        ],
        next_cursor=nxt,
    )


@admin.get("/lots/{lot_id}", response_model=LotOut, responses=problem_responses(service.LotUnknown))
def get_lot(lot_id: str, db: DbSession, _: ViewerAuth) -> LotOut:
    """One car park with its live state, active keys and the tariff in force now."""
    return _lot_out(db, service.get_lot(db, lot_id))


@admin.patch(
    "/lots/{lot_id}",
    response_model=LotOut,
    responses=problem_responses(service.LotUnknown, service.OperatorUnknown, UpstreamUnavailable),
)
def update_lot(lot_id: str, data: LotUpdate, db: DbSession, r: Cache, who: AdminAuth) -> LotOut:
    """Rename, resize, move, hand over to another operator, or switch post-pay on or off."""
    return _lot_out(db, service.update_lot(db, r, lot_id, data, who))


@admin.get(
    "/lots/{lot_id}/tariffs",
    response_model=list[TariffVersionOut],
    responses=problem_responses(service.LotUnknown),
)
def list_tariffs(lot_id: str, db: DbSession, _: ViewerAuth) -> list[TariffVersionOut]:
    """The lot's tariff history, latest first; `in_force` marks the one pricing entries now."""
    versions = service.tariff_versions(db, lot_id)
    now = utcnow()
    current = next((v.id for v in versions if v.effective_from <= now), None)
    return [_version_out(v, current) for v in versions]


@admin.put(
    "/lots/{lot_id}/tariff",
    response_model=TariffVersionOut,
    responses=problem_responses(
        service.LotUnknown, TariffInvalid, service.TariffInPast, service.TariffVersionExists
    ),
)
def put_tariff(lot_id: str, data: TariffUpdate, db: DbSession, who: AdminAuth) -> TariffVersionOut:
    """Add a tariff version from `effective_from` (now when left out, never in the past).

    Stays are priced by the version in force at their entry, so earlier stays keep their price.
    """
    version = service.add_tariff_version(db, lot_id, data.effective_from, data.tariff, who)
    in_force = version.id if version.effective_from <= utcnow() else None
    return _version_out(version, in_force)


@admin.get(
    "/lots/{lot_id}/keys",
    response_model=list[KeyOut],
    responses=problem_responses(service.LotUnknown),
)
def list_keys(lot_id: str, db: DbSession, _: ViewerAuth) -> list[KeyOut]:
    """Every key of the lot, active and revoked, oldest first."""
    return [_key_out(key) for key in service.lot_keys(db, lot_id)]


@admin.post(
    "/lots/{lot_id}/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyOut,
    responses=problem_responses(
        service.LotUnknown, service.KeyIdTaken, service.TooManyKeys, PublicKeyInvalid
    ),
)
def add_key(lot_id: str, key: PublicKeyIn, db: DbSession, who: AdminAuth) -> KeyOut:
    """Register a connector's public key (two may be active at once, for rotation)."""
    return _key_out(service.add_lot_key(db, lot_id, key, who))


@admin.delete(
    "/lots/{lot_id}/keys/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(service.KeyUnknownHere),
)
def revoke_key(lot_id: str, key_id: str, db: DbSession, who: AdminAuth) -> None:
    """Revoke a key: it stops signing within seconds; its id stays on record, never reused."""
    service.revoke_lot_key(db, lot_id, key_id, who)


@admin.get("/districts", response_model=list[DistrictOut])
def list_districts(db: DbSession, _: ViewerAuth) -> list[DistrictOut]:
    """Every district platform, by code."""
    return [_district_out(db, d) for d in service.list_districts(db)]


@admin.post(
    "/districts",
    status_code=status.HTTP_201_CREATED,
    response_model=DistrictOut,
    responses=problem_responses(service.DistrictExists, service.DialectUnknown, PublicKeyInvalid),
)
def create_district(data: DistrictCreate, db: DbSession, who: AdminAuth) -> DistrictOut:
    """Add a district platform (districts are data: no code change needed)."""
    out = _district_out(db, service.create_district(db, data))
    audit.record(
        db, who, "district.create", "district", out.code, after=out.model_dump(mode="json")
    )
    return out


@admin.post(
    "/districts/{code}/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyOut,
    responses=problem_responses(
        NotFound, service.KeyIdTaken, service.TooManyKeys, PublicKeyInvalid
    ),
)
def add_district_key(code: str, key: PublicKeyIn, db: DbSession, who: AdminAuth) -> KeyOut:
    """Register a district platform's public key (two may be active at once)."""
    row = service.add_district_key(db, code, key)
    audit.record(
        db, who, "key.add", "district", code, after={"key_id": row.key_id, "district": code}
    )
    return KeyOut(key_id=row.key_id, created_at=row.created_at)


@admin.delete(
    "/districts/{code}/keys/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(service.KeyUnknownHere),
)
def revoke_district_key(code: str, key_id: str, db: DbSession, who: AdminAuth) -> None:
    """Revoke a district platform's key: the gateway refuses its signatures within seconds
    (it caches keys for 10 s); its id stays on record, never reused. Repeats answer 204."""
    row, revoked = service.revoke_district_key(db, code, key_id)
    if revoked:
        audit.record(
            db,
            who,
            "key.revoke",
            "district",
            code,
            before={"key_id": row.key_id, "district": code, "revoked_at": None},
            after={
                "key_id": row.key_id,
                "district": code,
                "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
            },
        )


@admin.get(
    "/audit",
    response_model=AuditPage,
    responses={**problem_responses(service.CursorInvalid, ValidationFailed), **UNMASK_RESPONSES},
)
def list_audit(
    request: Request,
    db: DbSession,
    view: AuditView,
    service_name: Annotated[
        str | None,
        Query(alias="service", max_length=20, examples=["billing"], description="Which service"),
    ] = None,
    entity: Annotated[str | None, Query(max_length=40, examples=["lot"])] = None,
    entity_id: Annotated[str | None, Query(max_length=200)] = None,
    actor: Annotated[str | None, Query(max_length=64, description="Admin token id")] = None,
    since: Annotated[
        Instant | None, Query(alias="from", description="From this time on (with offset)")
    ] = None,
    until: Annotated[
        Instant | None, Query(alias="to", description="Before this time (with offset)")
    ] = None,
    since_old: Annotated[
        Instant | None, Query(alias="since", deprecated=True, description="Same as `from`")
    ] = None,
    cursor: str | None = None,
    limit: Limit = 50,
) -> AuditPage:
    """The city's one audit log: every admin and finance write of every service (and every
    unmasked look-up), newest first: service, who, when, what, why, before and after. Plates
    and phones in the snapshots are masked (bank accounts too, for viewers)."""
    before_id = None
    if cursor:
        (raw,) = service.decode_cursor(cursor, 1)
        if not raw.isdigit():
            raise service.CursorInvalid("cursor was not issued by this API")
        before_id = int(raw)
    since = since or since_old
    for name, value in (("from", since), ("to", until)):
        if value is not None and value.tzinfo is None:
            raise ValidationFailed(f"{name} must carry a UTC offset")
    rows = audit.entries(
        db,
        service=service_name,
        entity=entity,
        entity_id=entity_id,
        actor=actor,
        since=since,
        until=until,
        before_id=before_id,
        limit=limit + 1,
    )
    page = rows[:limit]
    nxt = service.encode_cursor(str(page[-1].id)) if len(rows) > limit else None
    settings = request.app.state.settings
    return AuditPage(items=[_audit_out(e, view, settings) for e in page], next_cursor=nxt)


@public.get(
    "/v1/lots",
    response_model=list[LotNearby],
    responses=problem_responses(ValidationFailed, UpstreamUnavailable),
)
def lots_near(
    db: DbSession,
    r: Cache,
    near: Annotated[str, Query(pattern=NEAR_PATTERN, examples=["31.3017,120.5853"])],
    radius_m: Annotated[int, Query(gt=0, le=50_000)] = 2000,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> list[LotNearby]:
    """Car parks near a point, nearest first, with live free spaces and a tariff summary."""
    lat, lng = service.parse_near(near)
    now = utcnow()
    return [
        LotNearby(
            id=lot.id,
            code=lot.code,
            name=lot.name,
            district=lot.district,
            location=Location(lat=lot.lat, lng=lot.lng),
            distance_m=round(dist),
            capacity=lot.capacity,
            free_spaces=live.free_spaces if live else lot.capacity,
            postpay_enabled=lot.postpay_enabled,
            online=live.online(now) if live else False,
            tariff_summary=service.tariff_summary(doc),
        )
        for lot, dist, live, doc in service.lots_near(db, r, lat, lng, radius_m, limit)
    ]


@public.post(
    "/v1/quotes",
    response_model=QuoteOut,
    responses=problem_responses(
        service.LotUnknown,
        PlateColorInvalid,
        PlateInvalid,
        QuoteInputInvalid,
        service.StayTooLong,
        quote_auth.AuthRequired,
    ),
)
def create_quote(
    data: QuoteRequest, db: DbSession, caller: quote_auth.QuoteCallerDep, request: Request
) -> QuoteOut:
    """What a stay costs at a car park, with one breakdown line per stretch (SPEC §8).

    Priced by the tariff version in force at `entered_at`, exactly as billing prices the stay.
    Open to anyone without `plate`. With `plate` (its passes make their units free) it needs
    the driver's bearer token or the car park's connector signature: 401 `auth_required`
    otherwise. A plate that is not the driver's own (or a car park other than the signer's)
    is priced as if it held no pass there.
    """
    if data.plate is not None and not quote_auth.plate_shown(
        request.app.state.runtime, caller, data.lot_id, data.plate, data.plate_color
    ):
        data = data.model_copy(update={"plate": None})
    _, fee, breakdown = service.price(
        db,
        data.lot_id,
        data.entered_at,
        data.exited_at,
        data.vehicle_type,
        data.plate_color,
        free_windows=_pass_windows(db, data.lot_id, data),
    )
    return QuoteOut(lot_id=data.lot_id, fee_fen=fee, breakdown=breakdown)


def _pass_windows(
    db: DbSession, lot_id: str, data: QuoteRequest
) -> list[tuple[datetime, datetime]]:
    """The vehicle's passes as free windows, so quotes, billing and the live fee agree."""
    service.get_lot(db, lot_id)  # an unknown lot is `lot_unknown`, not an empty pass list
    return passes.pass_windows_for_stay(
        db, lot_id, data.plate, data.plate_color, data.entered_at, data.exited_at
    )


@internal.get("/keys/{key_id}", response_model=KeyResolution)
def resolve_key(key_id: str, db: DbSession, _: InternalAuth) -> KeyResolution:
    return service.resolve_key(db, key_id)


def _price(
    db: DbSession,
    lot_id: str,
    data: QuoteRequest,
    tariffs: service.TariffBook | None = None,
    book: passes.PassBook | None = None,
) -> PriceOut:
    if book is None:
        windows = _pass_windows(db, lot_id, data)
    else:
        service.get_lot(db, lot_id)
        windows = book.windows_for_stay(
            lot_id, data.plate, data.plate_color, data.entered_at, data.exited_at
        )
    lot, fee, breakdown = service.price(
        db,
        lot_id,
        data.entered_at,
        data.exited_at,
        data.vehicle_type,
        data.plate_color,
        free_windows=windows,
        tariffs=tariffs,
    )
    operator = db.get(Operator, lot.operator_id)
    return PriceOut(
        lot_id=lot.id,
        operator_id=lot.operator_id,
        fee_fen=fee,
        commission_bps=operator.commission_bps if operator else 0,
        breakdown=breakdown,
    )


@internal.post("/{lot_id}/price", response_model=PriceOut)
def price(lot_id: str, data: QuoteRequest, db: ReadDbSession, _: InternalAuth) -> PriceOut:
    return _price(db, lot_id, data)


@internal.post("/prices", response_model=PricesOut)
def prices(data: PricesIn, db: ReadDbSession, _: InternalAuth) -> PricesOut:
    """Many stays priced in one call (billing prices a poll of closed sessions at once), with
    the lots' tariff versions and the vehicles' passes read once for all; an item that cannot
    be priced carries its problem code and leaves the others alone."""
    tariffs = service.TariffBook(db, {item.lot_id for item in data.items})
    out: list[PriceItemOut] = []
    try:
        book = passes.PassBook(
            db,
            [(i.lot_id, i.plate, i.plate_color, i.entered_at, i.exited_at) for i in data.items],
        )
    except Problem:
        book = None  # a malformed plate among them: each item then reads its own passes
    for item in data.items:
        try:
            out.append(PriceItemOut(price=_price(db, item.lot_id, item, tariffs, book)))
        except Problem as exc:
            out.append(PriceItemOut(code=exc.code, detail=exc.detail))
    return PricesOut(items=out)


@internal.post("/{lot_id}/heartbeat", status_code=status.HTTP_204_NO_CONTENT)
def heartbeat(lot_id: str, beat: HeartbeatIn, db: DbSession, r: Cache, _: InternalAuth) -> None:
    service.record_heartbeat(db, r, lot_id, beat)


@internal.get("/stats", response_model=LotsStats)
def stats(db: DbSession, _: InternalAuth) -> LotsStats:
    return service.stats(db)
