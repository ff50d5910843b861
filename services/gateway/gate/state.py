"""The gateway's view of who may leave on post-pay, kept in Redis from account events.

Keys (all under `citypark:gw:`):
  vehicle:<plate>:<color>  → id of the driver who holds the vehicle verified
  claims:<plate>:<color>   → set of driver ids claiming it unverified (the gate says why not)
  driver:<id>              → hash {version, postpay}
  driver:<id>:vehicles     → set of "<plate>:<color>" the driver holds verified
  driver:<id>:claims       → set of "<plate>:<color>" the driver claims unverified
  eligible                 → set of "<plate>:<color>" allowed post-pay now (car parks get
                             them only as per-lot salted hashes: connector/eligibility.py)
  eligible:version         → counter, bumped on every change of `eligible`
  open:<lot>:<plate>:<color> → id of the session the gateway saw begin there
  entered:<lot>:<plate>:<color> → its entry time (RFC 3339), for the pass check at the exit
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import redis

from shared.events import AccountUpdated, Decision, PostpayStatus

P = "citypark:gw:"
OPEN_TTL_S = 90 * 24 * 3600  # how long the gateway remembers an open session


def vehicle_key(plate: str, color: str) -> str:
    return f"{plate}:{color}"


def plate_hash(plate: str, color: str) -> str:
    return hashlib.sha256(vehicle_key(plate, color).encode()).hexdigest()


def apply_account(r: redis.Redis, data: AccountUpdated) -> bool:
    """Replace what we know of a driver; an older snapshot than ours is ignored."""
    return apply_accounts(r, [data]) == 1


def apply_accounts(r: redis.Redis, snapshots: list[AccountUpdated]) -> int:
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
                return _apply_watched(pipe, list(newest.values()))
            except redis.WatchError:
                continue


def _apply_watched(pipe: redis.client.Pipeline, batch: list[AccountUpdated]) -> int:
    dkeys = [f"{P}driver:{d.driver_id}" for d in batch]
    pipe.watch(*dkeys)
    # Reads in one round trip each, on a second connection: they happen after the WATCH,
    # so any write to these keys from now on still aborts the EXEC below.
    reader = pipe.pipeline(transaction=False)
    for dkey in dkeys:
        reader.hget(dkey, "version")
    versions = reader.execute()
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
    for data, known in newer:
        # Only a proven vehicle belongs to the driver at the gate (an absent flag: unproven).
        new = {vehicle_key(v.plate, v.plate_color) for v in data.vehicles if v.verified}
        claims = {vehicle_key(v.plate, v.plate_color) for v in data.vehicles if not v.verified}
        old: set[str] = set(next(held)) if known else set()
        old_claims: set[str] = set(next(held)) if known else set()
        fresh.append((data, old - new, new))
        unclaimed += [(data.driver_id, vk) for vk in sorted(old_claims - claims)]
        claimed += [(data.driver_id, vk) for vk in sorted(claims)]
    if not fresh:
        pipe.unwatch()
        return 0
    # A vehicle that left this driver may already belong to another one (their events
    # travel on different partitions): only its own driver's entry is removed.
    dropped = [(data.driver_id, vk) for data, gone, _ in fresh for vk in sorted(gone)]
    owners: list[object] = []
    if dropped:
        pipe.watch(*[f"{P}vehicle:{vk}" for _, vk in dropped])
        owners = list(pipe.mget([f"{P}vehicle:{vk}" for _, vk in dropped]))
    # Few commands for many drivers (a rebuild writes a thousand at a time): one DEL, MSET,
    # SREM and SADD for the whole batch, then a set and a hash per driver.
    gone = [
        vk
        for (driver_id, vk), owner in zip(dropped, owners, strict=True)
        if owner is None or owner == driver_id
    ]
    owned: dict[str, str] = {}
    allowed: list[str] = []
    barred: list[str] = []
    for data, _, new in fresh:
        eligible = data.postpay == PostpayStatus.active
        for vk in new:
            owned[f"{P}vehicle:{vk}"] = data.driver_id
            (allowed if eligible else barred).append(vk)
    pipe.multi()
    if gone:
        pipe.delete(*[f"{P}vehicle:{vk}" for vk in gone])
        pipe.srem(f"{P}eligible", *gone)
    if owned:
        pipe.mset(owned)
    if barred:
        pipe.srem(f"{P}eligible", *barred)
    if allowed:
        pipe.sadd(f"{P}eligible", *allowed)
    for driver_id, vk in unclaimed:
        pipe.srem(f"{P}claims:{vk}", driver_id)
    for driver_id, vk in claimed:
        pipe.sadd(f"{P}claims:{vk}", driver_id)
    pipe.delete(*[f"{P}driver:{data.driver_id}:vehicles" for data, _, _ in fresh])
    pipe.delete(*[f"{P}driver:{data.driver_id}:claims" for data, _, _ in fresh])
    for driver_id, vk in claimed:
        pipe.sadd(f"{P}driver:{driver_id}:claims", vk)
    for data, _, new in fresh:
        dkey = f"{P}driver:{data.driver_id}"
        if new:
            pipe.sadd(f"{dkey}:vehicles", *new)
        pipe.hset(dkey, mapping={"version": data.version, "postpay": data.postpay.value})
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


def driver_of(r: redis.Redis, plate: str, color: str) -> str | None:
    value = r.get(vehicle_key_of(plate, color))
    return str(value) if value is not None else None


def decide(r: redis.Redis, *, plate: str, color: str, postpay_enabled: bool) -> GateAnswer:
    return decide_for(
        r, driver_of(r, plate, color), postpay_enabled=postpay_enabled, plate=plate, color=color
    )


def claimed_unverified(r: redis.Redis, plate: str, color: str) -> bool:
    """Does some driver claim the vehicle without having proven it?"""
    return bool(r.exists(f"{P}claims:{vehicle_key(plate, color)}"))


def decide_for(
    r: redis.Redis,
    driver_id: str | None,
    *,
    postpay_enabled: bool,
    plate: str | None = None,
    color: str | None = None,
) -> GateAnswer:
    """The decision for a vehicle whose verified driver (or none) is already known; with the
    plate, a vehicle nobody has proven but somebody claims is told apart from an unknown one."""
    if not postpay_enabled:
        return GateAnswer(Decision.pay_on_site, "lot_not_postpay", driver_id)
    if driver_id is None:
        if plate is not None and color is not None and claimed_unverified(r, plate, color):
            return GateAnswer(Decision.pay_on_site, "vehicle_unverified", None)
        return GateAnswer(Decision.pay_on_site, "not_enrolled", None)
    status = r.hget(f"{P}driver:{driver_id}", "postpay")
    if status == PostpayStatus.active:
        return GateAnswer(Decision.postpay, "enrolled", driver_id)
    if status == PostpayStatus.suspended:
        return GateAnswer(Decision.pay_on_site, "suspended_arrears", driver_id)
    return GateAnswer(Decision.pay_on_site, "no_account", driver_id)


def vehicle_key_of(plate: str, color: str) -> str:
    """The Redis key holding the vehicle's driver id."""
    return f"{P}vehicle:{vehicle_key(plate, color)}"


def open_key(lot_id: str, plate: str, color: str) -> str:
    """The Redis key holding the id of the session the gateway saw begin at the lot."""
    return f"{P}open:{lot_id}:{vehicle_key(plate, color)}"


def remember_open(r: redis.Redis, lot_id: str, plate: str, color: str, session_id: str) -> None:
    r.set(open_key(lot_id, plate, color), session_id, ex=OPEN_TTL_S)


def take_open(r: redis.Redis, lot_id: str, plate: str, color: str) -> str | None:
    value = r.getdel(open_key(lot_id, plate, color))
    return str(value) if value is not None else None


def restore_open(r: redis.Redis, sessions: list[OpenSession], *, now: datetime) -> int:
    """Put back the open sessions the sessions service holds; how many were missing.

    Only where the gateway has nothing: whatever it wrote since (a newer entry of the same
    vehicle at the same car park) is fresher than the service's record, which trails the
    gateway by the pipeline's delay."""
    pipe = r.pipeline(transaction=False)
    for s in sessions:
        ttl = OPEN_TTL_S - int((now - s.entered_at).total_seconds())
        if ttl <= 0:  # the gateway would have forgotten it by now
            continue
        pipe.set(open_key(s.lot_id, s.plate, s.plate_color), s.session_id, nx=True, ex=ttl)
        pipe.set(
            entered_key(s.lot_id, s.plate, s.plate_color),
            s.entered_at.isoformat(),
            nx=True,
            ex=ttl,
        )
    return sum(1 for done in pipe.execute()[::2] if done)


def entered_key(lot_id: str, plate: str, color: str) -> str:
    return f"{P}entered:{lot_id}:{vehicle_key(plate, color)}"


def entered_at(r: redis.Redis, lot_id: str, plate: str, color: str) -> datetime | None:
    value = r.get(entered_key(lot_id, plate, color))
    return datetime.fromisoformat(str(value)) if value is not None else None


def eligibility(r: redis.Redis) -> tuple[int, list[str]]:
    """The vehicles ("<plate>:<color>") allowed post-pay now and their version, read
    atomically (a change in between would label one set with the other's version)."""
    pipe = r.pipeline(transaction=True)
    pipe.get(f"{P}eligible:version")
    pipe.smembers(f"{P}eligible")
    version, members = pipe.execute()
    # A member without a colour is a sha256 left by the first format: a gate rebuild drops it.
    return int(version or 0), sorted(m for m in members if ":" in m)
