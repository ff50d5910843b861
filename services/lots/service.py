"""Rules of the registry. Services never commit: the request owns the transaction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.lots.models import District, DistrictKey, Lot, LotKey, Operator, TariffVersion
from services.lots.schemas import (
    DistrictCreate,
    HeartbeatIn,
    KeyResolution,
    LotCreate,
    OperatorCreate,
    PublicKeyIn,
)
from shared.errors import NotFound, problem
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
DIALECTS = ("canonical", "legacy-json", "xml", "csv")
MAX_STAY = timedelta(days=366)
MAX_KEYS = 2


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


def create_operator(db: Session, data: OperatorCreate) -> Operator:
    op = Operator(
        name=data.name,
        commission_bps=data.commission_bps,
        settlement_account=data.settlement_account,
    )
    db.add(op)
    db.flush()
    return op


def get_lot(db: Session, lot_id: str) -> Lot:
    lot = db.get(Lot, lot_id)
    if lot is None:
        raise LotUnknown(f"No car park with id {lot_id!r}")
    return lot


def lot_key_ids(db: Session, lot_id: str) -> list[str]:
    return list(
        db.scalars(select(LotKey.key_id).where(LotKey.lot_id == lot_id).order_by(LotKey.created_at))
    )


def create_lot(db: Session, data: LotCreate) -> Lot:
    if db.get(District, data.district) is None:
        raise DistrictUnknown(f"No district {data.district!r}")
    if db.get(Operator, data.operator_id) is None:
        raise OperatorUnknown(f"No operator {data.operator_id!r}")
    if db.scalar(select(Lot.id).where(Lot.code == data.code)) is not None:
        raise LotCodeTaken(f"Car park code {data.code!r} is taken")
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
    db.add(
        TariffVersion(
            lot_id=lot.id, effective_from=lot.created_at, document=tariff.model_dump(mode="json")
        )
    )
    db.flush()
    return lot


def set_tariff(db: Session, lot_id: str, effective_from: datetime, doc: dict[str, Any]) -> Tariff:
    get_lot(db, lot_id)
    tariff = parse_tariff(doc)
    existing = db.scalar(
        select(TariffVersion).where(
            TariffVersion.lot_id == lot_id, TariffVersion.effective_from == effective_from
        )
    )
    if existing is not None:
        existing.document = tariff.model_dump(mode="json")
    else:
        db.add(
            TariffVersion(
                lot_id=lot_id,
                effective_from=effective_from,
                document=tariff.model_dump(mode="json"),
            )
        )
    db.flush()
    return tariff


def add_lot_key(db: Session, lot_id: str, key: PublicKeyIn) -> LotKey:
    get_lot(db, lot_id)
    if len(lot_key_ids(db, lot_id)) >= MAX_KEYS:
        raise TooManyKeys("Delete the old key before adding a third")
    _key_id_free(db, key.key_id)
    row = LotKey(key_id=key.key_id, lot_id=lot_id, public_key_pem=_checked_pem(key))
    db.add(row)
    db.flush()
    return row


def delete_lot_key(db: Session, lot_id: str, key_id: str) -> None:
    row = db.get(LotKey, key_id)
    if row is None or row.lot_id != lot_id:
        raise KeyUnknownHere(f"Car park {lot_id} has no key {key_id!r}")
    db.delete(row)
    db.flush()


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
    return district


def add_district_key(db: Session, code: str, key: PublicKeyIn) -> DistrictKey:
    if db.get(District, code) is None:
        raise NotFound(f"No district {code!r}")
    count = (
        db.scalar(select(func.count()).select_from(DistrictKey).where(DistrictKey.district == code))
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
    return list(db.scalars(select(DistrictKey.key_id).where(DistrictKey.district == code)))


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
) -> tuple[Lot, int, list[dict[str, Any]]]:
    lot = get_lot(db, lot_id)
    if exited_at - entered_at > MAX_STAY:
        raise StayTooLong(f"{entered_at.isoformat()} → {exited_at.isoformat()}")
    result = quote(
        tariff_at(db, lot_id, entered_at), entered_at, exited_at, vehicle_type, plate_color
    )
    return lot, result.fee_fen, [line.model_dump(mode="json") for line in result.breakdown]


def resolve_key(db: Session, key_id: str) -> KeyResolution:
    lot_key = db.get(LotKey, key_id)
    if lot_key is not None:
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
    if district_key is not None:
        return KeyResolution(
            key_id=key_id,
            public_key_pem=district_key.public_key_pem,
            kind="district",
            district=district_key.district,
        )
    raise NotFound(f"No key {key_id!r}")


def record_heartbeat(db: Session, lot_id: str, beat: HeartbeatIn) -> Lot:
    lot = get_lot(db, lot_id)
    lot.free_spaces = min(beat.free_spaces, beat.total_spaces or beat.free_spaces)
    lot.sdk_version = beat.sdk_version
    lot.last_heartbeat_at = utcnow()
    db.flush()
    return lot


def distance_m(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    r = 6_371_000.0
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lng2 - lng1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * r * math.asin(math.sqrt(a))


def lots_near(
    db: Session, lat: float, lng: float, radius_m: int, limit: int = 50
) -> Sequence[tuple[Lot, float]]:
    # A bounding box narrows in SQL; the exact great-circle distance filters in Python.
    dlat = radius_m / 111_000
    dlng = radius_m / max(1.0, 111_000 * math.cos(math.radians(lat)))
    rows = db.scalars(
        select(Lot).where(
            Lot.lat.between(lat - dlat, lat + dlat), Lot.lng.between(lng - dlng, lng + dlng)
        )
    )
    found = [(lot, distance_m(lat, lng, lot.lat, lot.lng)) for lot in rows]
    found = [(lot, d) for lot, d in found if d <= radius_m]
    found.sort(key=lambda pair: pair[1])
    return found[:limit]


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


def stats(db: Session) -> dict[str, int]:
    def count(model: type) -> int:
        return int(db.scalar(select(func.count()).select_from(model)) or 0)

    return {
        "districts": count(District),
        "operators": count(Operator),
        "lots_connected": count(Lot),
        "capacity": int(db.scalar(select(func.coalesce(func.sum(Lot.capacity), 0))) or 0),
        "free_spaces_reported": int(
            db.scalar(select(func.coalesce(func.sum(Lot.free_spaces), 0))) or 0
        ),
    }
