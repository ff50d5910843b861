"""The gateway's view of who may leave on post-pay, kept in Redis from account events.

No key, member or value names a plate: a vehicle is its pseudonym `<ref>` (shared.pii
`plate_ref` of plate and colour), and the one place that needs the plate itself (the eligible
vehicles, which each car park gets as per-lot salted hashes: connector/eligibility.py) keeps it
encrypted (shared.pii `encrypt`). Keys (all under `citypark:gw:`):
  vehicle:<ref>            → id of the driver who holds the vehicle verified
  claims:<ref>             → set of driver ids claiming it unverified (the gate says why not)
  driver:<id>              → hash {version, postpay, layout}
  driver:<id>:vehicles     → set of <ref> the driver holds verified
  driver:<id>:claims       → set of <ref> the driver claims unverified
  eligible:plates          → hash {<ref> → encrypted "<plate>:<color>"} allowed post-pay now
  eligible:version         → counter, bumped on every change of `eligible:plates`
  open:<lot>:<ref>         → id of the session the gateway saw begin there
  entered:<lot>:<ref>      → its entry time (RFC 3339), for the pass check at the exit

`LAYOUT` names this layout. Keys of an earlier one (plates in clear) are never read: a driver
hash without `layout` counts as unknown, so the next snapshot of that driver is written in
full; `citypark gate rebuild` (which every gateway also runs at start when the rebuild marker
names another layout) rewrites everyone and deletes what the earlier layout left behind.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import redis

from shared import pii
from shared.events import AccountUpdated, Decision, PostpayStatus
from shared.settings import Settings

P = "citypark:gw:"
LAYOUT = "2"  # 1 keyed vehicles by "<plate>:<color>" in clear
ELIGIBLE = f"{P}eligible:plates"
OPEN_TTL_S = 90 * 24 * 3600  # how long the gateway remembers an open session


def vehicle_key(plate: str, color: str) -> str:
    """What the car park hashes: "<plate>:<color>" (never a Redis key or member)."""
    return f"{plate}:{color}"


def plate_hash(plate: str, color: str) -> str:
    return hashlib.sha256(vehicle_key(plate, color).encode()).hexdigest()


def ref(settings: Settings, plate: str, color: str) -> str:
    """The vehicle's pseudonym, what the gate state is keyed by."""
    return pii.plate_ref(settings, plate, color)


def is_ref(value: str) -> bool:
    """Written by this layout (a pseudonym), not by an earlier one (a plate in clear)."""
    return value.startswith("v_") and len(value) == 34


def apply_account(r: redis.Redis, settings: Settings, data: AccountUpdated) -> bool:
    """Replace what we know of a driver; an older snapshot than ours is ignored."""
    return apply_accounts(r, settings, [data]) == 1


def apply_accounts(r: redis.Redis, settings: Settings, snapshots: list[AccountUpdated]) -> int:
    """Replace what we know of several drivers at once; how many were newer than ours.

    Atomic against every other writer (the account consumer, a rebuild, another replica):
    the driver keys are WATCHed while their versions are compared, so an older snapshot can
    never overwrite a newer one that lands between the read and the write; on a conflict
    the whole batch is read and decided again."""
    newest: dict[str, AccountUpdated] = {}
    for data in snapshots:  # a batch naming a driver twice keeps its newest snapshot
        if data.driver_id not in newest or data.version > newest[data.driver_id].version:
            newest[data.driver_id] = data
    if not newest:
        return 0
    with r.pipeline(transaction=True) as pipe:
        while True:
            try:
                return _apply_watched(pipe, settings, list(newest.values()))
            except redis.WatchError:
                continue


def _apply_watched(
    pipe: redis.client.Pipeline, settings: Settings, batch: list[AccountUpdated]
) -> int:
    dkeys = [f"{P}driver:{d.driver_id}" for d in batch]
    pipe.watch(*dkeys)
    # Reads in one round trip each, on a second connection: they happen after the WATCH,
    # so any write to these keys from now on still aborts the EXEC below.
    reader = pipe.pipeline(transaction=False)
    for dkey in dkeys:
        reader.hmget(dkey, "version", "layout")
    # A driver written by an earlier layout is unknown: their sets name plates in clear.
    versions = [v if layout == LAYOUT else None for v, layout in reader.execute()]
    newer = [
        (data, current is not None)
        for data, current in zip(batch, versions, strict=True)
        if current is None or int(current) < data.version
    ]
    # Only a driver we knew has vehicles to forget (none at all right after a loss).
    for data, known in newer:
        if known:
            reader.smembers(f"{P}driver:{data.driver_id}:vehicles")
            reader.smembers(f"{P}driver:{data.driver_id}:claims")
    held = iter(reader.execute())
    fresh: list[tuple[AccountUpdated, set[str], set[str]]] = []
    # Unverified claims: (driver, vehicle) pairs to drop and to add; each driver only ever
    # touches its own membership, so the order of different drivers' events does not matter.
    unclaimed: list[tuple[str, str]] = []
    claimed: list[tuple[str, str]] = []
    plates: dict[str, str] = {}  # ref → "<plate>:<color>", for the eligible vehicles
    for data, known in newer:
        # Only a proven vehicle belongs to the driver at the gate (an absent flag: unproven).
        new: set[str] = set()
        for v in data.vehicles:
            if v.verified:
                vref = ref(settings, v.plate, v.plate_color)
                new.add(vref)
                plates[vref] = vehicle_key(v.plate, v.plate_color)
        claims = {ref(settings, v.plate, v.plate_color) for v in data.vehicles if not v.verified}
        old: set[str] = set(next(held)) if known else set()
        old_claims: set[str] = set(next(held)) if known else set()
        fresh.append((data, old - new, new))
        unclaimed += [(data.driver_id, vr) for vr in sorted(old_claims - claims)]
        claimed += [(data.driver_id, vr) for vr in sorted(claims)]
    if not fresh:
        pipe.unwatch()
        return 0
    # A vehicle that left this driver may already belong to another one (their events
    # travel on different partitions): only its own driver's entry is removed.
    dropped = [(data.driver_id, vr) for data, gone, _ in fresh for vr in sorted(gone)]
    owners: list[object] = []
    if dropped:
        pipe.watch(*[f"{P}vehicle:{vr}" for _, vr in dropped])
        owners = list(pipe.mget([f"{P}vehicle:{vr}" for _, vr in dropped]))
    # Few commands for many drivers (a rebuild writes a thousand at a time): one DEL, MSET,
    # HDEL and HSET for the whole batch, then a set and a hash per driver.
    gone = [
        vr
        for (driver_id, vr), owner in zip(dropped, owners, strict=True)
        if owner is None or owner == driver_id
    ]
    owned: dict[str, str] = {}
    allowed: dict[str, str] = {}
    barred: list[str] = []
    for data, _, new in fresh:
        eligible = data.postpay == PostpayStatus.active
        for vr in new:
            owned[f"{P}vehicle:{vr}"] = data.driver_id
            if eligible:
                allowed[vr] = pii.encrypt(settings, plates[vr])
            else:
                barred.append(vr)
    pipe.multi()
    if gone:
        pipe.delete(*[f"{P}vehicle:{vr}" for vr in gone])
        pipe.hdel(ELIGIBLE, *gone)
    if owned:
        pipe.mset(owned)
    if barred:
        pipe.hdel(ELIGIBLE, *barred)
    if allowed:
        pipe.hset(ELIGIBLE, mapping=allowed)
    for driver_id, vr in unclaimed:
        pipe.srem(f"{P}claims:{vr}", driver_id)
    for driver_id, vr in claimed:
        pipe.sadd(f"{P}claims:{vr}", driver_id)
    pipe.delete(*[f"{P}driver:{data.driver_id}:vehicles" for data, _, _ in fresh])
    pipe.delete(*[f"{P}driver:{data.driver_id}:claims" for data, _, _ in fresh])
    for driver_id, vr in claimed:
        pipe.sadd(f"{P}driver:{driver_id}:claims", vr)
    for data, _, new in fresh:
        dkey = f"{P}driver:{data.driver_id}"
        if new:
            pipe.sadd(f"{dkey}:vehicles", *new)
        pipe.hset(
            dkey,
            mapping={"version": data.version, "postpay": data.postpay.value, "layout": LAYOUT},
        )
    pipe.incr(f"{P}eligible:version")
    pipe.execute()
    return len(fresh)


@dataclass(frozen=True)
class OpenSession:
    """A session the sessions service holds open: what the exit gate needs of it."""

    session_id: str
    lot_id: str
    plate: str
    plate_color: str
    entered_at: datetime


@dataclass(frozen=True)
class GateAnswer:
    decision: Decision
    reason: str
    driver_id: str | None


def driver_of(r: redis.Redis, settings: Settings, plate: str, color: str) -> str | None:
    value = r.get(vehicle_key_of(settings, plate, color))
    return str(value) if value is not None else None


def decide(
    r: redis.Redis, settings: Settings, *, plate: str, color: str, postpay_enabled: bool
) -> GateAnswer:
    return decide_for(
        r,
        driver_of(r, settings, plate, color),
        postpay_enabled=postpay_enabled,
        vehicle=ref(settings, plate, color),
    )


def claimed_unverified(r: redis.Redis, settings: Settings, plate: str, color: str) -> bool:
    """Does some driver claim the vehicle without having proven it?"""
    return _claimed(r, ref(settings, plate, color))


def _claimed(r: redis.Redis, vehicle: str) -> bool:
    return bool(r.exists(f"{P}claims:{vehicle}"))


def decide_for(
    r: redis.Redis,
    driver_id: str | None,
    *,
    postpay_enabled: bool,
    vehicle: str | None = None,
) -> GateAnswer:
    """The decision for a vehicle whose verified driver (or none) is already known; with the
    vehicle's pseudonym (`ref`), a vehicle nobody has proven but somebody claims is told apart
    from an unknown one."""
    if not postpay_enabled:
        return GateAnswer(Decision.pay_on_site, "lot_not_postpay", driver_id)
    if driver_id is None:
        if vehicle is not None and _claimed(r, vehicle):
            return GateAnswer(Decision.pay_on_site, "vehicle_unverified", None)
        return GateAnswer(Decision.pay_on_site, "not_enrolled", None)
    status = r.hget(f"{P}driver:{driver_id}", "postpay")
    if status == PostpayStatus.active:
        return GateAnswer(Decision.postpay, "enrolled", driver_id)
    if status == PostpayStatus.suspended:
        return GateAnswer(Decision.pay_on_site, "suspended_arrears", driver_id)
    return GateAnswer(Decision.pay_on_site, "no_account", driver_id)


def vehicle_key_of(settings: Settings, plate: str, color: str) -> str:
    """The Redis key holding the vehicle's driver id."""
    return f"{P}vehicle:{ref(settings, plate, color)}"


def open_key(settings: Settings, lot_id: str, plate: str, color: str) -> str:
    """The Redis key holding the id of the session the gateway saw begin at the lot."""
    return f"{P}open:{lot_id}:{ref(settings, plate, color)}"


def remember_open(
    r: redis.Redis, settings: Settings, lot_id: str, plate: str, color: str, session_id: str
) -> None:
    r.set(open_key(settings, lot_id, plate, color), session_id, ex=OPEN_TTL_S)


def take_open(
    r: redis.Redis, settings: Settings, lot_id: str, plate: str, color: str
) -> str | None:
    value = r.getdel(open_key(settings, lot_id, plate, color))
    return str(value) if value is not None else None


def restore_open(
    r: redis.Redis, settings: Settings, sessions: list[OpenSession], *, now: datetime
) -> int:
    """Put back the open sessions the sessions service holds; how many were missing.

    Only where the gateway has nothing: whatever it wrote since (a newer entry of the same
    vehicle at the same car park) is fresher than the service's record, which trails the
    gateway by the pipeline's delay."""
    pipe = r.pipeline(transaction=False)
    for s in sessions:
        ttl = OPEN_TTL_S - int((now - s.entered_at).total_seconds())
        if ttl <= 0:  # the gateway would have forgotten it by now
            continue
        pipe.set(
            open_key(settings, s.lot_id, s.plate, s.plate_color), s.session_id, nx=True, ex=ttl
        )
        pipe.set(
            entered_key(settings, s.lot_id, s.plate, s.plate_color),
            s.entered_at.isoformat(),
            nx=True,
            ex=ttl,
        )
    return sum(1 for done in pipe.execute()[::2] if done)


def entered_key(settings: Settings, lot_id: str, plate: str, color: str) -> str:
    return f"{P}entered:{lot_id}:{ref(settings, plate, color)}"


def entered_at(
    r: redis.Redis, settings: Settings, lot_id: str, plate: str, color: str
) -> datetime | None:
    value = r.get(entered_key(settings, lot_id, plate, color))
    return datetime.fromisoformat(str(value)) if value is not None else None


def eligibility(r: redis.Redis) -> tuple[int, dict[str, str]]:
    """The vehicles allowed post-pay now ({ref → encrypted "<plate>:<color>"}, opened with
    `eligible_vehicle`) and their version, read atomically (a change in between would label
    one set with the other's version)."""
    pipe = r.pipeline(transaction=True)
    pipe.get(f"{P}eligible:version")
    pipe.hgetall(ELIGIBLE)
    version, members = pipe.execute()
    return int(version or 0), dict(members)


def eligible_vehicle(settings: Settings, sealed: str) -> tuple[str, str]:
    """(plate, colour) of one entry of `eligibility`."""
    plate, _, color = pii.decrypt(settings, sealed).rpartition(":")
    return plate, color
