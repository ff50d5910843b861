"""Passes and whitelists (SPEC §10): what a car park sold or granted, and what it makes free.

The lots service owns passes because it owns what they modify: the price of a stay. A pass
turns into `free_windows` for the tariff engine, so billing, quotes and the live fee all read
the same intervals; the gateway asks `covering_kind` for the `free` gate decision.

Validity and windows are read on the lot's clock (the time zone of the lot's tariff when the
pass is written): a window `{start: "21:00", end: "07:00"}` covers every night inside the
validity; a date without a time means that whole local day (`valid_to` inclusive).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy import func, or_, select, tuple_
from sqlalchemy.orm import Session

from services.lots.models import Lot, Pass
from services.lots.service import get_lot, tariff_at
from shared.errors import PlateColorInvalid, PlateInvalid, problem
from shared.pii_columns import index_in
from shared.plates import normalize_plate, parse_plate_color
from shared.timeutil import utcnow

PassValidityInvalid = problem(
    422, "pass_validity_invalid", "valid_to must lie after valid_from, at most 10 years on"
)
PassWindowInvalid = problem(422, "pass_window_invalid", "A window needs distinct HH:MM bounds")
PassIdInvalid = problem(
    422, "pass_id_invalid", "A pass id is 1-64 letters, digits or . _ : - characters"
)
PassUnknown = problem(404, "pass_unknown", "The car park has no pass with this id")

MAX_VALIDITY = timedelta(days=3653)
PASS_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
CLOCK = r"^([01]\d|2[0-3]):[0-5]\d$"


class PassKind(StrEnum):
    monthly = "monthly"
    whitelist = "whitelist"


class PassWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: str = Field(pattern=CLOCK, examples=["21:00"])
    end: str = Field(pattern=CLOCK, examples=["07:00"])


class PassPut(BaseModel):
    """A pass as a car park pushes it; `valid_from`/`valid_to` are instants or local dates."""

    model_config = ConfigDict(extra="forbid")

    plate: str = Field(max_length=32, examples=["苏E12345"])
    plate_color: str = Field(examples=["blue"])
    kind: PassKind
    valid_from: AwareDatetime | date = Field(examples=["2026-11-01"])
    valid_to: AwareDatetime | date = Field(examples=["2026-11-30"])
    window: PassWindow | None = None


class PassOut(BaseModel):
    pass_id: str
    lot_id: str
    plate: str
    plate_color: str
    kind: PassKind
    valid_from: datetime
    valid_to: datetime
    window: PassWindow | None
    time_zone: str
    updated_at: datetime
    status: str = Field(
        default="stored", description="`created`, `updated` or `unchanged` on a PUT"
    )


class DriverPassOut(PassOut):
    lot_code: str
    lot_name: str
    state: str = Field(description="`active`, `upcoming` or `expired`")


class LotPasses(BaseModel):
    """A lot's live passes for the gate: what the gateway caches and lots' SDKs mirror."""

    version: int
    passes: list[PassOut]


class VehicleIn(BaseModel):
    plate: str
    plate_color: str


class VehiclesIn(BaseModel):
    vehicles: list[VehicleIn] = Field(max_length=50)


class CoverIn(BaseModel):
    plate: str
    plate_color: str
    entered_at: AwareDatetime
    exited_at: AwareDatetime


class CoverOut(BaseModel):
    covered: bool
    reason: PassKind | None = Field(
        default=None, description="`whitelist` when a whitelist alone covers the stay"
    )


def check_pass_id(pass_id: str) -> str:
    if not PASS_ID.match(pass_id):
        raise PassIdInvalid(f"{pass_id!r} is not a valid pass id")
    return pass_id


def _instant(value: datetime | date, zone: ZoneInfo, *, end: bool) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    # A bare date is a whole local day; the end date is included.
    day = value + timedelta(days=1) if end else value
    return datetime.combine(day, time(0), zone).astimezone(UTC)


def out(p: Pass, status: str = "stored") -> PassOut:
    window = (
        PassWindow(start=p.window_start, end=p.window_end)
        if p.window_start is not None and p.window_end is not None
        else None
    )
    return PassOut(
        pass_id=p.pass_id,
        lot_id=p.lot_id,
        plate=p.plate,
        plate_color=p.plate_color,
        kind=PassKind(p.kind),
        valid_from=p.valid_from,
        valid_to=p.valid_to,
        window=window,
        time_zone=p.time_zone,
        updated_at=p.updated_at,
        status=status,
    )


def put_pass(db: Session, lot_id: str, pass_id: str, data: PassPut) -> PassOut:
    """Create or replace a pass; repeating the same PUT changes nothing (`unchanged`)."""
    check_pass_id(pass_id)
    get_lot(db, lot_id)
    if data.window is not None and data.window.start == data.window.end:
        raise PassWindowInvalid("window start and end must differ (send null for all day)")
    plate = normalize_plate(data.plate)
    color = parse_plate_color(data.plate_color).value
    now = utcnow()
    zone_name = tariff_at(db, lot_id, now).time_zone
    zone = ZoneInfo(zone_name)
    valid_from = _instant(data.valid_from, zone, end=False)
    valid_to = _instant(data.valid_to, zone, end=True)
    if not valid_from < valid_to <= valid_from + MAX_VALIDITY:
        raise PassValidityInvalid(f"{valid_from.isoformat()} → {valid_to.isoformat()}")
    fields = {
        "plate": plate,
        "plate_color": color,
        "kind": data.kind.value,
        "valid_from": valid_from,
        "valid_to": valid_to,
        "window_start": data.window.start if data.window else None,
        "window_end": data.window.end if data.window else None,
        "time_zone": zone_name,
        "deleted_at": None,
    }
    row = db.get(Pass, (lot_id, pass_id), with_for_update=True)
    if row is None:
        row = Pass(lot_id=lot_id, pass_id=pass_id, created_at=now, updated_at=now, **fields)
        db.add(row)
        db.flush()
        return out(row, "created")
    if all(getattr(row, name) == value for name, value in fields.items()):
        return out(row, "unchanged")
    for name, value in fields.items():
        setattr(row, name, value)
    row.updated_at = now
    db.flush()
    return out(row, "updated")


def delete_pass(db: Session, lot_id: str, pass_id: str) -> None:
    """Withdraw a pass. A repeated DELETE answers the same; an unknown id is `pass_unknown`."""
    check_pass_id(pass_id)
    row = db.get(Pass, (lot_id, pass_id), with_for_update=True)
    if row is None:
        raise PassUnknown(f"No pass {pass_id!r} at car park {lot_id}")
    if row.deleted_at is None:
        row.deleted_at = row.updated_at = utcnow()
        db.flush()


def lot_passes(db: Session, lot_id: str) -> LotPasses:
    """The lot's passes not yet expired, with a version that moves on every change."""
    get_lot(db, lot_id)
    now = utcnow()
    last = db.scalar(select(func.max(Pass.updated_at)).where(Pass.lot_id == lot_id))
    rows = db.scalars(
        select(Pass)
        .where(Pass.lot_id == lot_id, Pass.valid_to > now, Pass.deleted_at.is_(None))
        .order_by(Pass.pass_id)
    )
    version = int(last.timestamp() * 1000) if last is not None else 0
    return LotPasses(version=version, passes=[out(p) for p in rows])


def vehicle_passes(
    db: Session, lot_id: str, plate: str, color: str, start: datetime, end: datetime
) -> list[Pass]:
    """The vehicle's passes at the lot whose validity meets `[start, end]`."""
    return list(
        db.scalars(
            select(Pass).where(
                Pass.lot_id == lot_id,
                Pass.plate_bidx == index_in(db, "plate", plate),
                Pass.plate_color == color,
                Pass.valid_from <= end,
                Pass.valid_to > start,
                Pass.deleted_at.is_(None),
            )
        )
    )


def _clock(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


def windows_of(p: Pass, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """The `[from, to)` intervals in which `p` makes units free that meet `[start, end]`."""
    lo, hi = max(p.valid_from, start), min(p.valid_to, end)
    if lo > hi:
        return []
    if p.window_start is None or p.window_end is None:
        return [(p.valid_from, p.valid_to)]
    zone = ZoneInfo(p.time_zone)
    w_start, w_end = _clock(p.window_start), _clock(p.window_end)
    crosses_midnight = w_end <= w_start
    spans: list[tuple[datetime, datetime]] = []
    # Start a day early: yesterday's night window may still run this morning.
    day = lo.astimezone(zone).date() - timedelta(days=1)
    while day <= hi.astimezone(zone).date():
        a = datetime.combine(day, w_start, zone).astimezone(UTC)
        end_day = day + timedelta(days=1) if crosses_midnight else day
        b = datetime.combine(end_day, w_end, zone).astimezone(UTC)
        a, b = max(a, p.valid_from), min(b, p.valid_to)
        if a < b and b > lo and a <= hi:
            spans.append((a, b))
        day += timedelta(days=1)
    return spans


def free_windows(
    passes: Sequence[Pass], start: datetime, end: datetime
) -> list[tuple[datetime, datetime]]:
    return [span for p in passes for span in windows_of(p, start, end)]


def _covers(spans: list[tuple[datetime, datetime]], start: datetime, end: datetime) -> bool:
    """Whether the union of `[a, b)` spans holds every instant of the stay.

    A zero-length stay (the entry is unknown) is covered when its one instant is."""
    reach = start
    for a, b in sorted(spans):
        if a > reach:
            break  # a gap
        if b > reach:
            reach = b
            if reach >= end:
                return True
    return False


def covering_kind(
    db: Session, lot_id: str, plate: str, color: str, entered_at: datetime, exited_at: datetime
) -> PassKind | None:
    """The `free` reason when passes cover every moment of the stay, else None.

    Covering every moment is stricter than a fee of 0 (a unit that merely starts inside a
    window is free too), so a `free` answer never meets a charge later."""
    plate = normalize_plate(plate)
    color = parse_plate_color(color).value
    start, end = entered_at.astimezone(UTC), exited_at.astimezone(UTC)
    found = vehicle_passes(db, lot_id, plate, color, start, end)
    whitelists = [p for p in found if p.kind == PassKind.whitelist]
    if whitelists and _covers(free_windows(whitelists, start, end), start, end):
        return PassKind.whitelist
    if found and _covers(free_windows(found, start, end), start, end):
        return PassKind.monthly
    return None


def pass_windows_for_stay(
    db: Session,
    lot_id: str,
    plate: str | None,
    color: str,
    entered_at: datetime,
    exited_at: datetime,
) -> list[tuple[datetime, datetime]]:
    """What the tariff engine takes as `free_windows` for this vehicle's stay (none without
    a plate: an anonymous quote is the tariff alone)."""
    if plate is None:
        return []
    plate = normalize_plate(plate)
    color = parse_plate_color(color).value
    start, end = entered_at.astimezone(UTC), exited_at.astimezone(UTC)
    return free_windows(vehicle_passes(db, lot_id, plate, color, start, end), start, end)


class PassBook:
    """The passes of many stays' vehicles, read in one query, for pricing many stays at once;
    each stay gets exactly the windows `pass_windows_for_stay` would give it."""

    def __init__(
        self, db: Session, stays: Sequence[tuple[str, str | None, str, datetime, datetime]]
    ):
        """`stays`: (lot id, plate or None, colour, entered at, exited at)."""
        self._passes: dict[tuple[str, str, str], list[Pass]] = {}
        wanted = [
            (lot_id, normalize_plate(plate), parse_plate_color(color).value, start, end)
            for lot_id, plate, color, start, end in stays
            if plate is not None
        ]
        if not wanted:
            return
        rows = db.scalars(
            select(Pass).where(
                # Plates are encrypted: the vehicles are found by their blind index.
                tuple_(Pass.lot_id, Pass.plate_bidx, Pass.plate_color).in_(
                    {
                        (lot_id, index_in(db, "plate", plate), color)
                        for lot_id, plate, color, _, _ in wanted
                    }
                ),
                Pass.valid_from <= max(end for *_, end in wanted).astimezone(UTC),
                Pass.valid_to > min(start for *_, start, _ in wanted).astimezone(UTC),
                Pass.deleted_at.is_(None),
            )
        )
        for p in rows:
            self._passes.setdefault((p.lot_id, p.plate, p.plate_color), []).append(p)

    def windows_for_stay(
        self, lot_id: str, plate: str | None, color: str, entered_at: datetime, exited_at: datetime
    ) -> list[tuple[datetime, datetime]]:
        if plate is None:
            return []
        key = (lot_id, normalize_plate(plate), parse_plate_color(color).value)
        start, end = entered_at.astimezone(UTC), exited_at.astimezone(UTC)
        meeting = [
            p for p in self._passes.get(key, []) if p.valid_from <= end and p.valid_to > start
        ]
        return free_windows(meeting, start, end)


def passes_of_vehicles(db: Session, vehicles: Sequence[VehicleIn]) -> list[DriverPassOut]:
    """A driver's passes at every car park (not withdrawn; expired ones for 90 days)."""
    keys: list[tuple[str, str]] = []
    for v in vehicles:
        try:
            keys.append((normalize_plate(v.plate), parse_plate_color(v.plate_color).value))
        except (PlateInvalid, PlateColorInvalid):
            continue  # a vehicle registered before a plate rule tightened holds no pass here
    if not keys:
        return []
    now = utcnow()
    rows = db.execute(
        select(Pass, Lot)
        .join(Lot, Lot.id == Pass.lot_id)
        .where(
            or_(
                *[
                    tuple_(Pass.plate_bidx, Pass.plate_color)
                    == (index_in(db, "plate", plate), color)
                    for plate, color in keys
                ]
            ),
            Pass.valid_to > now - timedelta(days=90),
            Pass.deleted_at.is_(None),
        )
        .order_by(Pass.valid_to.desc(), Pass.pass_id)
    )
    result: list[DriverPassOut] = []
    for p, lot in rows:
        state = "expired" if p.valid_to <= now else "upcoming" if p.valid_from > now else "active"
        result.append(
            DriverPassOut(
                **out(p).model_dump(exclude={"status"}),
                lot_code=lot.code,
                lot_name=lot.name,
                state=state,
            )
        )
    return result
