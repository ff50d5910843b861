"""Offline gate decisions, bounded by what the city actually told the car park.

While the city is away the gate decides exits from its eligibility snapshot
(`GET /v1/connector/eligibility`) and the replay carries what it decided (`offline_decision`).
The city takes an offline `postpay` only when it can back it:

* the car park was served the snapshot `eligibility_version` it names, and had it at
  `decided_at` (served before, not yet replaced by a newer one: `snapshot_unknown`,
  `snapshot_superseded` otherwise);
* the vehicle was eligible in that snapshot (`not_eligible_in_snapshot` otherwise);
* `decided_at` falls inside an outage of that car park: after its last request the city
  received before that instant, and not in the future (`outside_outage` otherwise). The
  gateway keeps, per car park, the gaps of at least `OUTAGE_MIN_S` between requests it
  received (`mark_seen`); a claim is inside an outage when it falls inside such a gap.

What it cannot back is decided as the city decides it now and kept as an offline claim for the
operator to take up (`GET /v1/admin/unbacked-claims`); so is a `pay_on_site` or `free` the gate
gave a car the city would have let out on `postpay` (the car paid at the gate, or the operator
let it go: the city charges nothing after it). Rules in docs/gate.md.

The snapshots are kept as served: per car park and version the digest of the hashed plates,
how they were hashed (`kdf`: scrypt with the car park's salt, connector/eligibility.py) and,
stored once per distinct content, the hashes themselves (32 bytes each), for at least
`eligibility_snapshot_retention_days` after the car park got a newer one. Checking a claim
costs one salted hash of its plate, and only for an offline `postpay` the city would not give
now.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import redis
import structlog
from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.gateway.connector.eligibility import Kdf
from services.gateway.models import EligibilityServed, EligibilitySet, OfflineClaim
from shared.db import transaction
from shared.runtime import Runtime
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)

P = "citypark:gw:"
OUTAGE_MIN_S = 1.0  # shorter silences between a car park's requests are not outages
GAPS_KEPT = 2000  # per car park; older gaps also go after the retention period
# The car park gets a snapshot a moment after the city served it, and stops using the old one
# a moment after that.
SERVED_GRACE = timedelta(seconds=10)
PRUNE_EVERY_S = 600.0
HASH_BYTES = 32

SNAPSHOT_UNKNOWN = "snapshot_unknown"
SNAPSHOT_SUPERSEDED = "snapshot_superseded"
NOT_ELIGIBLE = "not_eligible_in_snapshot"
OUTSIDE_OUTAGE = "outside_outage"
CITY_WOULD_POSTPAY = "city_would_postpay"


# -- when the car park was in touch ---------------------------------------------------------


def _seen_key(lot_id: str) -> str:
    return f"{P}lot:{lot_id}:seen"


def _gaps_key(lot_id: str) -> str:
    return f"{P}lot:{lot_id}:gaps"


def mark_seen(rt: Runtime, lot_id: str, now: float | None = None) -> None:
    """The car park reached the city (a signed request of its own arrived) at `now`; a silence
    since its previous request of `OUTAGE_MIN_S` or more is remembered as a possible outage."""
    at_ms = int((time.time() if now is None else now) * 1000)
    retention_s = rt.settings.eligibility_snapshot_retention_days * 24 * 3600
    r = rt.redis
    previous = r.set(_seen_key(lot_id), at_ms, ex=retention_s, get=True)
    if previous is None or at_ms - int(previous) < OUTAGE_MIN_S * 1000:
        return
    gaps = _gaps_key(lot_id)
    pipe = r.pipeline(transaction=False)
    pipe.zadd(gaps, {f"{int(previous)}:{at_ms}": at_ms})
    pipe.zremrangebyscore(gaps, "-inf", at_ms - retention_s * 1000)
    pipe.zremrangebyrank(gaps, 0, -(GAPS_KEPT + 1))
    pipe.expire(gaps, retention_s)
    pipe.execute()


def within_outage(r: redis.Redis, lot_id: str, decided_at: datetime, now: datetime) -> bool:
    """Whether the car park had been out of touch since before `decided_at` (a silence of its
    requests spans it) and `decided_at` is not in the future."""
    if decided_at > now:
        return False
    at_ms = int(decided_at.timestamp() * 1000)
    # The first silence ending at or after the instant is the only one that can hold it.
    found = r.zrangebyscore(_gaps_key(lot_id), at_ms, "+inf", start=0, num=1)
    if not found:
        return False
    start, _, end = str(found[0]).partition(":")
    return int(start) < at_ms <= int(end)


# -- the snapshots served -------------------------------------------------------------------


def _pack(hashes: Sequence[str]) -> bytes:
    return b"".join(sorted(bytes.fromhex(h) for h in hashes))


def _insert_ignore(db: Session, model: Any, values: dict[str, Any], keys: list[str]) -> None:
    dialect = db.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    db.execute(insert(model).values(values).on_conflict_do_nothing(index_elements=keys))


_last_prune = 0.0
_prune_lock = threading.Lock()


def record_served(
    rt: Runtime, lot_id: str, version: int, hashes: Sequence[str], kdf: str | None
) -> None:
    """Remember that the car park got snapshot `version` with these hashed plates, hashed as
    `kdf` says (None: sha256, the first format)."""
    packed = _pack(hashes)
    # The hashing is part of the content: the same plates under another salt are another set.
    digest = hashlib.sha256(packed + (kdf or "").encode()).hexdigest()
    marker = f"{P}served:{lot_id}:{version}"
    if rt.redis.get(marker) == digest:
        return  # recorded already (the lot asked again after its passes changed)
    now = utcnow()
    with transaction(rt.request_sessionmaker) as db:
        if db.get(EligibilitySet, digest) is None:
            _insert_ignore(
                db,
                EligibilitySet,
                {"digest": digest, "hashes": packed, "created_at": now},
                ["digest"],
            )
        # The car park uses this one from now on; whatever it had before ends here.
        db.execute(
            update(EligibilityServed)
            .where(
                EligibilityServed.lot_id == lot_id,
                EligibilityServed.version != version,
                EligibilityServed.superseded_at.is_(None),
            )
            .values(superseded_at=now)
        )
        row = db.get(EligibilityServed, (lot_id, version))
        if row is None:
            _insert_ignore(
                db,
                EligibilityServed,
                {
                    "lot_id": lot_id,
                    "version": version,
                    "digest": digest,
                    "kdf": kdf,
                    "served_at": now,
                    "superseded_at": None,
                },
                ["lot_id", "version"],
            )
        else:
            # The same version with other plates: the gate state was rebuilt from zero and
            # counts again; the car park holds what it got last.
            row.digest, row.kdf, row.served_at, row.superseded_at = digest, kdf, now, None
    rt.redis.set(marker, digest, ex=24 * 3600)
    _maybe_prune(rt)


def _maybe_prune(rt: Runtime) -> None:
    global _last_prune
    with _prune_lock:
        if time.monotonic() - _last_prune < PRUNE_EVERY_S:
            return
        _last_prune = time.monotonic()
    with transaction(rt.request_sessionmaker) as db:
        prune(db, utcnow() - timedelta(days=rt.settings.eligibility_snapshot_retention_days))


def prune(db: Session, before: datetime) -> int:
    """Forget snapshots a car park stopped using before `before`, and plates no snapshot
    served still refers to; how many served snapshots went."""
    result = db.execute(delete(EligibilityServed).where(EligibilityServed.superseded_at < before))
    gone = getattr(result, "rowcount", 0)
    db.execute(
        delete(EligibilitySet).where(
            EligibilitySet.digest.not_in(select(EligibilityServed.digest).distinct())
        )
    )
    return int(gone or 0)


class _Sets:
    """Stored sets by digest: immutable, so a few are kept in memory for replays in bulk."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, db: Session, digest: str) -> bytes | None:
        with self.lock:
            if digest in self.items:
                self.items.move_to_end(digest)
                return self.items[digest]
        found = db.get(EligibilitySet, digest)
        if found is None:
            return None
        with self.lock:
            self.items[digest] = found.hashes
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return found.hashes


_sets = _Sets()


def _contains(packed: bytes, vehicle: bytes) -> bool:
    count = len(packed) // HASH_BYTES
    index = bisect.bisect_left(
        range(count), vehicle, key=lambda i: packed[i * HASH_BYTES : (i + 1) * HASH_BYTES]
    )
    return index < count and packed[index * HASH_BYTES : (index + 1) * HASH_BYTES] == vehicle


def vehicle_hash(kdf: str | None, plate: str, color: str) -> str:
    """The vehicle as the snapshot hashed it."""
    if kdf is None:
        return hashlib.sha256(f"{plate}:{color}".encode()).hexdigest()
    return Kdf.parse(kdf).hash(plate, color)


def unbacked_reason(
    rt: Runtime,
    lot_id: str,
    plate: str,
    color: str,
    version: int | None,
    decided_at: datetime,
    now: datetime,
) -> str | None:
    """Why an offline `postpay` cannot be backed by what the city told the car park, or None
    when it can."""
    if not within_outage(rt.redis, lot_id, decided_at, now):
        return OUTSIDE_OUTAGE
    if version is None:
        return SNAPSHOT_UNKNOWN
    with rt.read_sessionmaker() as db:
        served = db.get(EligibilityServed, (lot_id, version))
        if served is None or served.served_at > decided_at + SERVED_GRACE:
            return SNAPSHOT_UNKNOWN
        if served.superseded_at is not None and decided_at > served.superseded_at + SERVED_GRACE:
            return SNAPSHOT_SUPERSEDED
        packed = _sets.get(db, served.digest)
        kdf = served.kdf
    if packed is None or not _contains(packed, bytes.fromhex(vehicle_hash(kdf, plate, color))):
        return NOT_ELIGIBLE
    return None


# -- claims for the operator ----------------------------------------------------------------


def record_claim(rt: Runtime, **values: Any) -> None:
    """Keep an offline decision the city did not take as stated; once per event."""
    with transaction(rt.request_sessionmaker) as db:
        _insert_ignore(
            db, OfflineClaim, {**values, "recorded_at": utcnow()}, ["lot_id", "event_id"]
        )
    log.warning(
        "gateway.offline_claim",
        lot=values.get("lot_code"),
        event_id=values.get("event_id"),
        claimed=values.get("claimed_decision"),
        reason=values.get("reason"),
        decision=values.get("decision"),
    )


def claims(
    db: Session,
    *,
    lot_id: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
) -> Sequence[OfflineClaim]:
    """Newest first."""
    query = select(OfflineClaim).order_by(OfflineClaim.recorded_at.desc()).limit(limit)
    if lot_id is not None:
        query = query.where(OfflineClaim.lot_id == lot_id)
    if since is not None:
        query = query.where(OfflineClaim.recorded_at >= since)
    return db.scalars(query).all()
