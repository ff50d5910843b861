"""The gateway's view of who may leave on post-pay, kept in Redis from account events.

Keys (all under `citypark:gw:`):
  vehicle:<plate>:<color>  → driver id
  driver:<id>              → hash {version, postpay}
  driver:<id>:vehicles     → set of "<plate>:<color>"
  eligible                 → set of sha256("<plate>:<color>") allowed post-pay now
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


def vehicle_key(plate: str, color: str) -> str:
    return f"{plate}:{color}"


def plate_hash(plate: str, color: str) -> str:
    return hashlib.sha256(vehicle_key(plate, color).encode()).hexdigest()


def apply_account(r: redis.Redis, data: AccountUpdated) -> bool:
    """Replace what we know of a driver; an older snapshot than ours is ignored."""
    dkey = f"{P}driver:{data.driver_id}"
    current = r.hget(dkey, "version")
    if current is not None and int(current) >= data.version:
        return False
    new = {vehicle_key(v.plate, v.plate_color) for v in data.vehicles}
    old = set(r.smembers(f"{dkey}:vehicles"))  # type: ignore[arg-type]
    eligible = data.postpay == PostpayStatus.active
    pipe = r.pipeline(transaction=True)
    for vk in old - new:
        pipe.delete(f"{P}vehicle:{vk}")
        pipe.srem(f"{P}eligible", hashlib.sha256(vk.encode()).hexdigest())
    for vk in new:
        pipe.set(f"{P}vehicle:{vk}", data.driver_id)
        h = hashlib.sha256(vk.encode()).hexdigest()
        if eligible:
            pipe.sadd(f"{P}eligible", h)
        else:
            pipe.srem(f"{P}eligible", h)
    pipe.delete(f"{dkey}:vehicles")
    if new:
        pipe.sadd(f"{dkey}:vehicles", *new)
    pipe.hset(dkey, mapping={"version": data.version, "postpay": data.postpay.value})
    pipe.incr(f"{P}eligible:version")
    pipe.execute()
    return True


@dataclass(frozen=True)
class GateAnswer:
    decision: Decision
    reason: str
    driver_id: str | None


def driver_of(r: redis.Redis, plate: str, color: str) -> str | None:
    value = r.get(vehicle_key_of(plate, color))
    return str(value) if value is not None else None


def decide(r: redis.Redis, *, plate: str, color: str, postpay_enabled: bool) -> GateAnswer:
    return decide_for(r, driver_of(r, plate, color), postpay_enabled=postpay_enabled)


def decide_for(r: redis.Redis, driver_id: str | None, *, postpay_enabled: bool) -> GateAnswer:
    """The decision for a vehicle whose driver (or none) is already known."""
    if not postpay_enabled:
        return GateAnswer(Decision.pay_on_site, "lot_not_postpay", driver_id)
    if driver_id is None:
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
    r.set(open_key(lot_id, plate, color), session_id, ex=90 * 24 * 3600)


def take_open(r: redis.Redis, lot_id: str, plate: str, color: str) -> str | None:
    value = r.getdel(open_key(lot_id, plate, color))
    return str(value) if value is not None else None


def entered_key(lot_id: str, plate: str, color: str) -> str:
    return f"{P}entered:{lot_id}:{vehicle_key(plate, color)}"


def entered_at(r: redis.Redis, lot_id: str, plate: str, color: str) -> datetime | None:
    value = r.get(entered_key(lot_id, plate, color))
    return datetime.fromisoformat(str(value)) if value is not None else None


def eligibility(r: redis.Redis) -> tuple[int, list[str]]:
    version = int(r.get(f"{P}eligible:version") or 0)
    return version, sorted(r.smembers(f"{P}eligible"))  # type: ignore[arg-type]
