"""Live occupancy of every car park: entries and exits in real time, corrected by heartbeats.

The durable count lives in `lots_occupancy` and changes under that row's lock, in the same
transaction as the consumer's inbox row, so each event counts once. Redis holds the copy that
drivers' map reads (a GEO set of lots plus one hash per lot); it is written with absolute values
while the row lock is held, so writers never reorder, and `rebuild` repopulates it from the
database on start-up (a fresh or flushed Redis, or the in-process one of the embedded default).

A heartbeat is the lot's own count at the moment it arrives: events that occurred before the
last heartbeat are already in it and change nothing. A lot without a heartbeat for
`OFFLINE_AFTER` is offline.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

import redis
import structlog
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.lots.models import DailyParkings, Lot, Occupancy
from shared.errors import UpstreamUnavailable
from shared.events import Kind, ParkingEvent, SessionClosed
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)

GEO_KEY: Final[str] = "citypark:lots:geo"
OFFLINE_AFTER: Final[timedelta] = timedelta(minutes=5)
# Parkings are counted on the city's calendar, whatever the lot's tariff zone.
CITY_ZONE: Final[ZoneInfo] = ZoneInfo("Asia/Shanghai")


def _hash_key(lot_id: str) -> str:
    return f"citypark:lots:occ:{lot_id}"


@dataclass(frozen=True)
class LiveState:
    """What the map shows for one lot."""

    occupied: int
    capacity: int
    heartbeat_at: datetime | None

    @property
    def free_spaces(self) -> int:
        return max(self.capacity - self.occupied, 0)

    def online(self, now: datetime) -> bool:
        return self.heartbeat_at is not None and now - self.heartbeat_at < OFFLINE_AFTER


def is_online(heartbeat_at: datetime | None, now: datetime) -> bool:
    return LiveState(0, 0, heartbeat_at).online(now)


def _fields(lot: Lot, occ: Occupancy | None) -> dict[Any, str | int | float]:
    return {
        "occupied": occ.occupied if occ else 0,
        "capacity": lot.capacity,
        "heartbeat_at": occ.heartbeat_at.timestamp() if occ and occ.heartbeat_at else "",
    }


def _mirror(r: redis.Redis, lot: Lot, occ: Occupancy | None) -> None:
    try:
        pipe = r.pipeline(transaction=True)
        pipe.geoadd(GEO_KEY, (lot.lng, lot.lat, lot.id))
        pipe.hset(_hash_key(lot.id), mapping=_fields(lot, occ))
        pipe.execute()
    except redis.RedisError as exc:
        raise UpstreamUnavailable("The live occupancy store is unavailable; retry") from exc


def publish_lot(db: Session, r: redis.Redis, lot: Lot) -> None:
    """Put a lot (new, moved or resized) on the map with its current count."""
    _mirror(r, lot, db.get(Occupancy, lot.id))


def rebuild(db: Session, r: redis.Redis) -> int:
    """Copy every lot's position and count to Redis; returns how many lots."""
    counts = {o.lot_id: o for o in db.scalars(select(Occupancy))}
    lots = list(db.scalars(select(Lot)))
    for lot in lots:
        _mirror(r, lot, counts.get(lot.id))
    return len(lots)


def _locked(db: Session, lot_id: str) -> Occupancy:
    """The lot's occupancy row, created if missing, locked until the transaction ends."""
    dialect = db.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    db.execute(
        insert(Occupancy)
        .values(lot_id=lot_id, occupied=0, updated_at=utcnow())
        .on_conflict_do_nothing()
    )
    row = db.scalar(
        select(Occupancy)
        .where(Occupancy.lot_id == lot_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    assert row is not None  # inserted just above or already there
    return row


def apply_event(
    db: Session,
    r: redis.Redis,
    event: ParkingEvent,
    deferred: dict[str, tuple[Lot, Occupancy]] | None = None,
) -> bool:
    """Count an entry (+1) or exit (-1); False when it changed nothing.

    With `deferred`, the Redis copy is left to the caller (`mirror_all` once per batch, still
    under the row locks, before commit) instead of one write per event."""
    lot = db.get(Lot, event.lot_id)
    if lot is None:
        log.warning("occupancy.lot_unknown", lot_id=event.lot_id, event_id=event.event_id)
        return False
    occ = _locked(db, lot.id)
    if occ.heartbeat_at is not None and event.occurred_at < occ.heartbeat_at:
        return False
    step = 1 if event.kind is Kind.entry else -1
    # Clamped: a lot connected mid-day sees exits of cars it never saw enter.
    occupied = min(max(occ.occupied + step, 0), lot.capacity)
    if occupied == occ.occupied:
        return False
    occ.occupied = occupied
    occ.updated_at = utcnow()
    db.flush()
    if deferred is None:
        _mirror(r, lot, occ)
    else:
        deferred[lot.id] = (lot, occ)
    return True


def mirror_all(r: redis.Redis, touched: Iterable[tuple[Lot, Occupancy]]) -> None:
    """The Redis copy of many lots' counts in one round trip (their rows are still locked)."""
    touched = list(touched)
    if not touched:
        return
    try:
        pipe = r.pipeline(transaction=True)
        for lot, occ in touched:
            pipe.geoadd(GEO_KEY, (lot.lng, lot.lat, lot.id))
            pipe.hset(_hash_key(lot.id), mapping=_fields(lot, occ))
        pipe.execute()
    except redis.RedisError as exc:
        raise UpstreamUnavailable("The live occupancy store is unavailable; retry") from exc


def apply_heartbeat(db: Session, r: redis.Redis, lot: Lot, free_spaces: int) -> Occupancy:
    """Replace the count with the lot's own; the heartbeat also marks the lot online."""
    occ = _locked(db, lot.id)
    occ.occupied = lot.capacity - min(free_spaces, lot.capacity)
    occ.heartbeat_at = occ.updated_at = utcnow()
    db.flush()
    _mirror(r, lot, occ)
    return occ


def parking_day(closed: SessionClosed) -> tuple[date, str]:
    """Where a parking is counted: the city calendar day of its exit, and its district."""
    return closed.exited_at.astimezone(CITY_ZONE).date(), closed.district


def count_parkings(db: Session, counts: Mapping[tuple[date, str], int]) -> None:
    """Add parkings served per (day, district), one upsert per pair."""
    dialect = db.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    for (day, district), n in sorted(counts.items()):  # one lock order: no deadlock
        stmt = insert(DailyParkings).values(day=day, district=district, parkings=n)
        db.execute(
            stmt.on_conflict_do_update(
                index_elements=[DailyParkings.day, DailyParkings.district],
                set_={"parkings": DailyParkings.parkings + n},
            )
        )


def count_parking(db: Session, closed: SessionClosed) -> None:
    """One parking served, on the city calendar day of its exit, in its district."""
    count_parkings(db, {parking_day(closed): 1})


def live(r: redis.Redis, lot_ids: Sequence[str]) -> dict[str, LiveState]:
    """The map's view of these lots (lots Redis does not know are left out)."""
    try:
        pipe = r.pipeline(transaction=False)
        for lot_id in lot_ids:
            pipe.hgetall(_hash_key(lot_id))
        raw = pipe.execute()
    except redis.RedisError as exc:
        raise UpstreamUnavailable("The live occupancy store is unavailable; retry") from exc
    out: dict[str, LiveState] = {}
    for lot_id, fields in zip(lot_ids, raw, strict=True):
        if not fields:
            continue
        beat = fields.get("heartbeat_at") or ""
        out[lot_id] = LiveState(
            occupied=int(fields.get("occupied", 0)),
            capacity=int(fields.get("capacity", 0)),
            heartbeat_at=datetime.fromtimestamp(float(beat), tz=utcnow().tzinfo) if beat else None,
        )
    return out


def near(
    r: redis.Redis, lat: float, lng: float, radius_m: int, limit: int
) -> list[tuple[str, float]]:
    """Lot ids within `radius_m` of the point, nearest first, with their distance in metres."""
    try:
        found: Iterable[Any] = r.geosearch(
            GEO_KEY,
            longitude=lng,
            latitude=lat,
            radius=radius_m,
            unit="m",
            sort="ASC",
            count=limit,
            withdist=True,
        )
    except redis.RedisError as exc:
        raise UpstreamUnavailable("The live occupancy store is unavailable; retry") from exc
    return [(str(member), float(dist)) for member, dist in found]
