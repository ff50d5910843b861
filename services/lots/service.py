"""Rules of the registry. Services never commit: the request owns the transaction."""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import redis
from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from services.lots import audit, occupancy
from services.lots.districts import provision
from services.lots.models import (
    DailyParkings,
    District,
    DistrictKey,
    Lot,
    LotKey,
    Occupancy,
    Operator,
    TariffVersion,
)
from services.lots.schemas import (
    DistrictCreate,
    DistrictStats,
    HeartbeatIn,
    KeyResolution,
    LotCreate,
    LotsStats,
    LotUpdate,
    OperatorCreate,
    PublicKeyIn,
)
from shared.auth import Admin, Role
from shared.errors import CursorInvalid, NotFound, ValidationFailed, problem
from shared.money import format_yuan
from shared.signatures import load_public_key
from shared.tariff import Tariff, parse_tariff, quote
from shared.timeutil import utcnow
from shared.topics import SUZHOU_DISTRICTS

DistrictUnknown = problem(422, "district_unknown", "No such district")
OperatorUnknown = problem(422, "operator_unknown", "No such operator")
LotUnknown = problem(404, "lot_unknown", "No such car park")
LotCodeTaken = problem(409, "lot_code_taken", "A car park with this code exists")
DistrictExists = problem(409, "district_exists", "A district with this code exists")
KeyIdTaken = problem(409, "key_id_taken", "This key id is already registered")
TooManyKeys = problem(409, "too_many_keys", "A holder has at most two active keys (rotation)")
KeyUnknownHere = problem(404, "key_unknown", "No such key on this holder")
DialectUnknown = problem(422, "dialect_unknown", "Unknown district dialect")

StayTooLong = problem(422, "stay_too_long", "A stay longer than a year cannot be quoted")
OperatorNotFound = problem(404, "operator_unknown", "No such operator")
TariffInPast = problem(
    422, "tariff_effective_in_past", "A tariff version cannot take effect in the past"
)
TariffVersionExists = problem(
    409, "tariff_version_exists", "A different tariff version takes effect at that instant"
)
DIALECTS = ("canonical", "legacy-json", "xml", "csv")
MAX_STAY = timedelta(days=366)
MAX_KEYS = 2
# Writes made by the platform itself (seeding, tools) rather than through an admin token.
SYSTEM = Admin(id="system", role=Role.admin)
# `effective_from` a little behind the server clock (a client's "now") counts as now.
TARIFF_CLOCK_GRACE = timedelta(seconds=60)


def seed_districts(db: Session) -> int:
    """Insert the ten Suzhou districts that are missing; returns how many were added."""
    existing = set(db.scalars(select(District.code)))
    added = 0
    for d in SUZHOU_DISTRICTS:
        if d.code not in existing:
            db.add(District(code=d.code, name=d.name, dialect=d.dialect))
            added += 1
    db.flush()
    return added


def _key_id_free(db: Session, key_id: str) -> None:
    if db.get(LotKey, key_id) is not None or db.get(DistrictKey, key_id) is not None:
        raise KeyIdTaken(f"key_id {key_id!r} is already registered")


def _checked_pem(key: PublicKeyIn) -> str:
    load_public_key(key.public_key_pem)
    return key.public_key_pem.strip() + "\n"


def encode_cursor(*values: str) -> str:
    """An opaque keyset cursor: the sort key of the last row of a page."""
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, size: int) -> list[str]:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        raise CursorInvalid(f"cursor {cursor[:40]!r} was not issued by this API") from None
    if (
        not isinstance(values, list)
        or len(values) != size
        or not all(isinstance(v, str) for v in values)
    ):
        raise CursorInvalid(f"cursor {cursor[:40]!r} was not issued by this API")
    return values


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def operator_snapshot(op: Operator) -> dict[str, Any]:
    return {
        "id": op.id,
        "name": op.name,
        "commission_bps": op.commission_bps,
        "settlement_account": op.settlement_account,
    }


def lot_snapshot(lot: Lot) -> dict[str, Any]:
    return {
        "id": lot.id,
        "code": lot.code,
        "name": lot.name,
        "district": lot.district,
        "operator_id": lot.operator_id,
        "capacity": lot.capacity,
        "location": {"lat": lot.lat, "lng": lot.lng},
        "postpay_enabled": lot.postpay_enabled,
    }


def _key_snapshot(key: LotKey) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "lot_id": key.lot_id,
        "public_key_pem": key.public_key_pem,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


def _version_snapshot(version: TariffVersion | None) -> dict[str, Any] | None:
    if version is None:
        return None
    return {
        "id": version.id,
        "effective_from": version.effective_from.isoformat(),
        "tariff": version.document,
    }


def create_operator(db: Session, data: OperatorCreate, actor: Admin = SYSTEM) -> Operator:
    op = Operator(
        name=data.name,
        commission_bps=data.commission_bps,
        settlement_account=data.settlement_account,
    )
    db.add(op)
    db.flush()
    audit.record(db, actor, "operator.create", "operator", op.id, after=operator_snapshot(op))
    return op


def get_operator(db: Session, operator_id: str) -> Operator:
    op = db.get(Operator, operator_id)
    if op is None:
        raise OperatorNotFound(f"No operator with id {operator_id!r}")
    return op


def list_operators(
    db: Session, *, q: str | None, cursor: str | None, limit: int
) -> tuple[Sequence[Operator], str | None]:
    """Operators by name (then id), `q` matching the name; returns a page and the next cursor."""
    query = select(Operator).order_by(Operator.name, Operator.id).limit(limit + 1)
    if q:
        query = query.where(Operator.name.ilike(_like(q), escape="\\"))
    if cursor:
        name, op_id = decode_cursor(cursor, 2)
        query = query.where(
            or_(Operator.name > name, (Operator.name == name) & (Operator.id > op_id))
        )
    rows = db.scalars(query).all()
    page = rows[:limit]
    nxt = encode_cursor(page[-1].name, page[-1].id) if len(rows) > limit else None
    return page, nxt


def list_districts(db: Session) -> Sequence[District]:
    return db.scalars(select(District).order_by(District.code)).all()


def get_lot(db: Session, lot_id: str) -> Lot:
    lot = db.get(Lot, lot_id)
    if lot is None:
        raise LotUnknown(f"No car park with id {lot_id!r}")
    return lot


def list_lots(
    db: Session,
    *,
    district: str | None,
    operator_id: str | None,
    q: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[Sequence[tuple[Lot, Occupancy | None]], str | None]:
    """Lots by code, filtered; `q` matches code or name. Returns a page and the next cursor."""
    query = (
        select(Lot, Occupancy)
        .outerjoin(Occupancy, Occupancy.lot_id == Lot.id)
        .order_by(Lot.code)
        .limit(limit + 1)
    )
    if district:
        query = query.where(Lot.district == district)
    if operator_id:
        query = query.where(Lot.operator_id == operator_id)
    if q:
        pattern = _like(q)
        query = query.where(
            or_(Lot.code.ilike(pattern, escape="\\"), Lot.name.ilike(pattern, escape="\\"))
        )
    if cursor:
        (after,) = decode_cursor(cursor, 1)
        query = query.where(Lot.code > after)
    rows = [(lot, occ) for lot, occ in db.execute(query)]
    page = rows[:limit]
    nxt = encode_cursor(page[-1][0].code) if len(rows) > limit else None
    return page, nxt


def lot_key_ids(db: Session, lot_id: str) -> list[str]:
    """The lot's active keys (revoked ones stay on record but sign nothing)."""
    return list(
        db.scalars(
            select(LotKey.key_id)
            .where(LotKey.lot_id == lot_id, LotKey.revoked_at.is_(None))
            .order_by(LotKey.created_at)
        )
    )


def lot_keys(db: Session, lot_id: str) -> Sequence[LotKey]:
    """Every key the lot ever had, active and revoked, oldest first."""
    get_lot(db, lot_id)
    return db.scalars(
        select(LotKey).where(LotKey.lot_id == lot_id).order_by(LotKey.created_at, LotKey.key_id)
    ).all()


def create_lot(
    db: Session, data: LotCreate, actor: Admin = SYSTEM, *, cache: redis.Redis | None = None
) -> Lot:
    """Register a lot with its keys and first tariff version.

    Without `cache` the lot reaches the map with its first heartbeat or event, or the next
    start-up's rebuild.
    """
    if db.get(District, data.district) is None:
        raise DistrictUnknown(f"No district {data.district!r}")
    if db.get(Operator, data.operator_id) is None:
        raise OperatorUnknown(f"No operator {data.operator_id!r}")
    if db.scalar(select(Lot.id).where(Lot.code == data.code)) is not None:
        raise LotCodeTaken(f"Car park code {data.code!r} is taken")
    if len({key.key_id for key in data.public_keys}) < len(data.public_keys):
        raise KeyIdTaken("The same key_id is given twice")
    tariff = parse_tariff(data.tariff)
    lot = Lot(
        code=data.code,
        name=data.name,
        district=data.district,
        operator_id=data.operator_id,
        capacity=data.capacity,
        lat=data.location.lat,
        lng=data.location.lng,
        postpay_enabled=data.postpay_enabled,
    )
    db.add(lot)
    db.flush()
    for key in data.public_keys:
        _key_id_free(db, key.key_id)
        db.add(LotKey(key_id=key.key_id, lot_id=lot.id, public_key_pem=_checked_pem(key)))
    version = TariffVersion(
        lot_id=lot.id, effective_from=lot.created_at, document=tariff.model_dump(mode="json")
    )
    db.add(version)
    db.flush()
    after = {
        **lot_snapshot(lot),
        "key_ids": [key.key_id for key in data.public_keys],
        "tariff": _version_snapshot(version),
    }
    audit.record(db, actor, "lot.create", "lot", lot.id, after=after)
    if cache is not None:
        occupancy.publish_lot(db, cache, lot)
    return lot


def update_lot(db: Session, r: redis.Redis, lot_id: str, data: LotUpdate, actor: Admin) -> Lot:
    """Change what ops may change on a connected lot; the code and district stay."""
    lot = get_lot(db, lot_id)
    before = lot_snapshot(lot)
    changes = data.model_dump(exclude_unset=True)
    if "operator_id" in changes and db.get(Operator, data.operator_id) is None:
        raise OperatorUnknown(f"No operator {data.operator_id!r}")
    for name in ("name", "operator_id", "capacity", "postpay_enabled"):
        if name in changes:
            setattr(lot, name, changes[name])
    if data.location is not None:
        lot.lat, lot.lng = data.location.lat, data.location.lng
    db.flush()
    after = lot_snapshot(lot)
    if after != before:
        audit.record(db, actor, "lot.update", "lot", lot.id, before=before, after=after)
        occupancy.publish_lot(db, r, lot)
    return lot


def tariff_versions(db: Session, lot_id: str) -> Sequence[TariffVersion]:
    """The lot's whole tariff history, latest `effective_from` first."""
    get_lot(db, lot_id)
    return db.scalars(
        select(TariffVersion)
        .where(TariffVersion.lot_id == lot_id)
        .order_by(TariffVersion.effective_from.desc())
    ).all()


def add_tariff_version(
    db: Session,
    lot_id: str,
    effective_from: datetime | None,
    doc: dict[str, Any],
    actor: Admin,
) -> TariffVersion:
    """Add a version taking effect now or later; versions already in force never change.

    Stays are priced by the version in force at their entry, so a version starting in the past
    would reprice stays already billed or quoted: refused. Repeating the same version is a
    no-op (a retried request); a different document at the same instant is a conflict.
    """
    get_lot(db, lot_id)
    tariff = parse_tariff(doc)
    document = tariff.model_dump(mode="json")
    now = utcnow()
    if effective_from is not None:
        same = db.scalar(
            select(TariffVersion).where(
                TariffVersion.lot_id == lot_id, TariffVersion.effective_from == effective_from
            )
        )
        if same is not None:
            if same.document == document:
                return same
            raise TariffVersionExists(
                f"Version {same.id} takes effect at {effective_from.isoformat()}"
            )
        if effective_from < now - TARIFF_CLOCK_GRACE:
            raise TariffInPast(
                f"effective_from {effective_from.isoformat()} is before now ({now.isoformat()})"
            )
    starts = max(effective_from or now, now)
    previous = db.scalar(
        select(TariffVersion)
        .where(TariffVersion.lot_id == lot_id, TariffVersion.effective_from <= starts)
        .order_by(TariffVersion.effective_from.desc())
        .limit(1)
    )
    version = TariffVersion(lot_id=lot_id, effective_from=starts, document=document)
    db.add(version)
    db.flush()
    audit.record(
        db,
        actor,
        "tariff.add_version",
        "lot",
        lot_id,
        before=_version_snapshot(previous),
        after=_version_snapshot(version),
    )
    return version


def add_lot_key(db: Session, lot_id: str, key: PublicKeyIn, actor: Admin = SYSTEM) -> LotKey:
    get_lot(db, lot_id)
    if len(lot_key_ids(db, lot_id)) >= MAX_KEYS:
        raise TooManyKeys("Revoke the old key before adding a third")
    _key_id_free(db, key.key_id)
    row = LotKey(key_id=key.key_id, lot_id=lot_id, public_key_pem=_checked_pem(key))
    db.add(row)
    db.flush()
    audit.record(db, actor, "key.add", "lot", lot_id, after=_key_snapshot(row))
    return row


def revoke_lot_key(db: Session, lot_id: str, key_id: str, actor: Admin = SYSTEM) -> LotKey:
    """Stop a key signing; revoking a revoked key is a no-op."""
    row = db.get(LotKey, key_id)
    if row is None or row.lot_id != lot_id:
        raise KeyUnknownHere(f"Car park {lot_id} has no key {key_id!r}")
    if row.revoked_at is None:
        before = _key_snapshot(row)
        row.revoked_at = utcnow()
        db.flush()
        audit.record(
            db, actor, "key.revoke", "lot", lot_id, before=before, after=_key_snapshot(row)
        )
    return row


delete_lot_key = revoke_lot_key  # a deleted key stays on record, revoked


def create_district(db: Session, data: DistrictCreate) -> District:
    if data.dialect not in DIALECTS:
        raise DialectUnknown(f"dialect must be one of {', '.join(DIALECTS)}")
    if db.get(District, data.code) is not None:
        raise DistrictExists(f"District {data.code!r} exists")
    district = District(code=data.code, name=data.name, dialect=data.dialect)
    db.add(district)
    db.flush()
    for key in data.public_keys:
        add_district_key(db, data.code, key)
    provision.on_district_created(db, data.code)  # its Kafka topic, once committed
    return district


def add_district_key(db: Session, code: str, key: PublicKeyIn) -> DistrictKey:
    if db.get(District, code) is None:
        raise NotFound(f"No district {code!r}")
    count = (
        db.scalar(
            select(func.count())
            .select_from(DistrictKey)
            .where(DistrictKey.district == code, DistrictKey.revoked_at.is_(None))
        )
        or 0
    )
    if count >= MAX_KEYS:
        raise TooManyKeys("Delete the old key before adding a third")
    _key_id_free(db, key.key_id)
    row = DistrictKey(key_id=key.key_id, district=code, public_key_pem=_checked_pem(key))
    db.add(row)
    db.flush()
    return row


def district_key_ids(db: Session, code: str) -> list[str]:
    """The district platform's active keys."""
    return list(
        db.scalars(
            select(DistrictKey.key_id).where(
                DistrictKey.district == code, DistrictKey.revoked_at.is_(None)
            )
        )
    )


def revoke_district_key(db: Session, code: str, key_id: str) -> tuple[DistrictKey, bool]:
    """Stop a district platform's key signing; (the key, whether it was active until now).
    Its id stays on record, never reused."""
    row = db.get(DistrictKey, key_id)
    if row is None or row.district != code:
        raise KeyUnknownHere(f"District {code!r} has no key {key_id!r}")
    if row.revoked_at is not None:
        return row, False
    row.revoked_at = utcnow()
    db.flush()
    return row, True


def tariff_at(db: Session, lot_id: str, at: datetime) -> Tariff:
    """The version in force at `at` (the entry time); before the first, the first one."""
    row = db.scalar(
        select(TariffVersion)
        .where(TariffVersion.lot_id == lot_id, TariffVersion.effective_from <= at)
        .order_by(TariffVersion.effective_from.desc())
        .limit(1)
    )
    if row is None:
        row = db.scalar(
            select(TariffVersion)
            .where(TariffVersion.lot_id == lot_id)
            .order_by(TariffVersion.effective_from)
            .limit(1)
        )
    if row is None:
        raise LotUnknown(f"Car park {lot_id} has no tariff")
    return parse_tariff(row.document)


class TariffBook:
    """The tariff versions of some lots, read in one query, for pricing many stays at once;
    it picks the version in force exactly as `tariff_at` does."""

    def __init__(self, db: Session, lot_ids: Iterable[str]) -> None:
        self._by_lot: dict[str, list[TariffVersion]] = {}
        rows = db.scalars(
            select(TariffVersion)
            .where(TariffVersion.lot_id.in_(set(lot_ids)))
            .order_by(TariffVersion.lot_id, TariffVersion.effective_from)
        )
        for row in rows:
            self._by_lot.setdefault(row.lot_id, []).append(row)
        self._parsed: dict[str, Tariff] = {}

    def at(self, lot_id: str, at: datetime) -> Tariff:
        rows = self._by_lot.get(lot_id)
        if not rows:
            raise LotUnknown(f"Car park {lot_id} has no tariff")
        starts = [r.effective_from for r in rows]
        # The last version in force at `at`; before the first, the first one.
        row = rows[max(bisect.bisect_right(starts, at) - 1, 0)]
        if row.id not in self._parsed:
            self._parsed[row.id] = parse_tariff(row.document)
        return self._parsed[row.id]


def current_tariff_doc(db: Session, lot_id: str) -> dict[str, Any] | None:
    row = db.scalar(
        select(TariffVersion)
        .where(TariffVersion.lot_id == lot_id, TariffVersion.effective_from <= utcnow())
        .order_by(TariffVersion.effective_from.desc())
        .limit(1)
    )
    return row.document if row else None


def price(
    db: Session,
    lot_id: str,
    entered_at: datetime,
    exited_at: datetime,
    vehicle_type: str,
    plate_color: str,
    free_windows: Sequence[tuple[datetime, datetime]] = (),
    tariffs: TariffBook | None = None,
) -> tuple[Lot, int, list[dict[str, Any]]]:
    lot = get_lot(db, lot_id)
    if exited_at - entered_at > MAX_STAY:
        raise StayTooLong(f"{entered_at.isoformat()} → {exited_at.isoformat()}")
    result = quote(
        tariffs.at(lot_id, entered_at) if tariffs else tariff_at(db, lot_id, entered_at),
        entered_at,
        exited_at,
        vehicle_type,
        plate_color,
        free_windows=free_windows,
    )
    return lot, result.fee_fen, [line.model_dump(mode="json") for line in result.breakdown]


def resolve_key(db: Session, key_id: str) -> KeyResolution:
    lot_key = db.get(LotKey, key_id)
    if lot_key is not None and lot_key.revoked_at is None:
        lot = get_lot(db, lot_key.lot_id)
        return KeyResolution(
            key_id=key_id,
            public_key_pem=lot_key.public_key_pem,
            kind="lot",
            lot_id=lot.id,
            lot_code=lot.code,
            operator_id=lot.operator_id,
            district=lot.district,
            postpay_enabled=lot.postpay_enabled,
        )
    district_key = db.get(DistrictKey, key_id)
    if district_key is not None and district_key.revoked_at is None:
        return KeyResolution(
            key_id=key_id,
            public_key_pem=district_key.public_key_pem,
            kind="district",
            district=district_key.district,
        )
    raise NotFound(f"No key {key_id!r}")


def record_heartbeat(db: Session, r: redis.Redis, lot_id: str, beat: HeartbeatIn) -> Lot:
    lot = get_lot(db, lot_id)
    lot.free_spaces = min(beat.free_spaces, beat.total_spaces or beat.free_spaces)
    lot.sdk_version = beat.sdk_version
    lot.last_heartbeat_at = utcnow()
    db.flush()
    occupancy.apply_heartbeat(db, r, lot, lot.free_spaces)
    return lot


def distance_m(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    r = 6_371_000.0
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lng2 - lng1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * r * math.asin(math.sqrt(a))


def parse_near(near: str) -> tuple[float, float]:
    try:
        lat_s, lng_s = near.split(",")
        lat, lng = float(lat_s), float(lng_s)
    except ValueError as exc:
        raise ValidationFailed("near must be 'lat,lng', e.g. 31.30,120.58") from exc
    # Redis geo indexes cover ±85.05° of latitude (Web Mercator), ample for a city.
    if not (-85 <= lat <= 85 and -180 <= lng <= 180) or not (
        math.isfinite(lat) and math.isfinite(lng)
    ):
        raise ValidationFailed("near is outside valid coordinates")
    return lat, lng


def lots_near(
    db: Session, r: redis.Redis, lat: float, lng: float, radius_m: int, limit: int = 50
) -> list[tuple[Lot, float, occupancy.LiveState | None, dict[str, Any] | None]]:
    """Lots within the radius, nearest first: (lot, distance, live state, tariff in force).

    Redis answers the geometry and the live counts; the registry adds names and tariffs in
    two queries whatever the number of lots.
    """
    found = occupancy.near(r, lat, lng, radius_m, limit)
    ids = [lot_id for lot_id, _ in found]
    if not ids:
        return []
    lots = {lot.id: lot for lot in db.scalars(select(Lot).where(Lot.id.in_(ids)))}
    state = occupancy.live(r, ids)
    tariffs = current_tariff_docs(db, ids)
    return [
        (lots[lot_id], dist, state.get(lot_id), tariffs.get(lot_id))
        for lot_id, dist in found
        if lot_id in lots  # a lot whose creation rolled back may linger on the map
    ]


def current_tariff_docs(db: Session, lot_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The version in force now of each lot, in one query."""
    now = utcnow()
    latest = (
        select(TariffVersion.lot_id, func.max(TariffVersion.effective_from).label("at"))
        .where(TariffVersion.lot_id.in_(lot_ids), TariffVersion.effective_from <= now)
        .group_by(TariffVersion.lot_id)
        .subquery()
    )
    rows = db.scalars(
        select(TariffVersion).join(
            latest,
            (TariffVersion.lot_id == latest.c.lot_id)
            & (TariffVersion.effective_from == latest.c.at),
        )
    )
    return {row.lot_id: row.document for row in rows}


def tariff_summary(doc: dict[str, Any] | None) -> str:
    if not doc:
        return "no tariff"
    small = doc.get("rates", {}).get("small", {})
    parts = [f"{doc.get('free_minutes', 0)} min free"]
    for p in small.get("periods", []):
        unit = f"{format_yuan(p['unit_fen'])}/{p['unit_minutes']} min"
        if p.get("first_block_minutes"):
            first = f"first {p['first_block_minutes']} min {format_yuan(p['first_block_fen'])}"
            unit = f"{first}, {unit}"
        parts.append(f"{p['start']}-{p['end']}: {unit}")
    if small.get("daily_cap_fen"):
        parts.append(f"daily cap {format_yuan(small['daily_cap_fen'])}")
    return "; ".join(parts)


def stats(db: Session) -> LotsStats:
    """Registry and live figures, city-wide and per district, from this service's own data."""

    def count(model: type) -> int:
        return int(db.scalar(select(func.count()).select_from(model)) or 0)

    now = utcnow()
    today = now.astimezone(occupancy.CITY_ZONE).date()
    by_district = {d.code: DistrictStats(district=d.code, name=d.name) for d in list_districts(db)}
    rows = db.execute(
        select(Lot.district, Lot.capacity, Occupancy.occupied, Occupancy.heartbeat_at).outerjoin(
            Occupancy, Occupancy.lot_id == Lot.id
        )
    )
    for district, capacity, occupied, heartbeat_at in rows:
        d = by_district[district]
        d.lots_connected += 1
        d.capacity += capacity
        d.free_spaces += max(capacity - (occupied or 0), 0)
        if occupancy.is_online(heartbeat_at, now):
            d.lots_online += 1
        else:
            d.lots_offline += 1
    parkings = db.execute(
        select(
            DailyParkings.district,
            func.sum(DailyParkings.parkings),
            func.sum(case((DailyParkings.day == today, DailyParkings.parkings), else_=0)),
        ).group_by(DailyParkings.district)
    )
    for district, total, on_day in parkings:
        if district in by_district:
            by_district[district].parkings_served = int(total or 0)
            by_district[district].parkings_today = int(on_day or 0)
    districts = list(by_district.values())
    return LotsStats(
        districts=len(districts),
        operators=count(Operator),
        lots_connected=sum(d.lots_connected for d in districts),
        lots_online=sum(d.lots_online for d in districts),
        lots_offline=sum(d.lots_offline for d in districts),
        capacity=sum(d.capacity for d in districts),
        free_spaces=sum(d.free_spaces for d in districts),
        free_spaces_reported=int(
            db.scalar(select(func.coalesce(func.sum(Lot.free_spaces), 0))) or 0
        ),
        parkings_today=sum(d.parkings_today for d in districts),
        by_district=districts,
    )
