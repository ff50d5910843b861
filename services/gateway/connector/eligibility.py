"""Eligibility snapshots a car park cannot turn back into plates (docs/privacy.md).

Every post-pay car park gets, for each vehicle allowed to leave on post-pay, a memory-hard
salted hash: scrypt("<plate>:<plate_color>", salt=<the lot's salt>, n, r, p). The salt is
random per car park and sent with the snapshot, so the gate can hash the plate in front of it
once (~27 ms) and look it up, while reversing the list costs one such hash per candidate plate
per car park: no precomputed table and no cheap GPU search (16 MiB per hash) help.

What the gateway keeps (all under `citypark:gw:`):
  lot:<lot>:salt      → the car park's salt (hex); rotating it is a new snapshot version
  lot:<lot>:vh:<salt> → hash {vehicle pseudonym (`shared.pii.plate_ref`) → salted hash}: the
                        cache, so that a vehicle newly eligible costs one hash per post-pay
                        car park and a vehicle that stays costs nothing
  lot:<lot>:built     → "<version>:<salt>" of the last complete build, the answer's fast path
  snapshot:lots       → car parks with a salt, which the warmer keeps up to date

A build is bounded in time: a vehicle whose hash is not computed yet is left out of the
snapshot (the gate then asks it to pay on site offline, never the reverse), and the answer says
`complete: false` until the warmer or later requests have caught up. The online exit decision
never computes any of this.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import structlog

from services.gateway.gate import state
from shared.runtime import Runtime

log = structlog.get_logger(__name__)

P = state.P
FORMAT = 2  # 1 was sha256(plate:plate_color) for the whole city: no longer served
# ~27 ms and 16 MiB per hash on one core of the reference machine (docs/privacy.md).
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
DKLEN = 32
SALT_BYTES = 16
MAXMEM = 64 * 1024 * 1024
CACHE_TTL_S = 30 * 24 * 3600  # a car park that stops asking has its hashes forgotten
REQUEST_BUDGET_S = 1.0  # hashing one answer may do; the warmer does the rest


@dataclass(frozen=True)
class Kdf:
    """How the snapshot's vehicles are hashed: what the gate needs to hash a plate alike."""

    salt: str  # hex
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P
    dklen: int = DKLEN
    name: str = "scrypt"

    def hash(self, plate: str, color: str) -> str:
        return hashlib.scrypt(
            state.vehicle_key(plate, color).encode(),
            salt=bytes.fromhex(self.salt),
            n=self.n,
            r=self.r,
            p=self.p,
            maxmem=MAXMEM,
            dklen=self.dklen,
        ).hex()

    def spec(self) -> str:
        """One line, kept with each snapshot served: `scrypt$16384$8$1$32$<salt>`."""
        return f"{self.name}${self.n}${self.r}${self.p}${self.dklen}${self.salt}"

    @classmethod
    def parse(cls, spec: str) -> Kdf:
        name, n, r, p, dklen, salt = spec.split("$")
        if name != "scrypt":
            raise ValueError(f"unknown snapshot hash {name!r}")
        return cls(salt=salt, n=int(n), r=int(r), p=int(p), dklen=int(dklen))


@dataclass(frozen=True)
class Built:
    version: int
    kdf: Kdf
    hashes: list[str]
    complete: bool


def _salt_key(lot_id: str) -> str:
    return f"{P}lot:{lot_id}:salt"


def _cache_key(lot_id: str, salt: str) -> str:
    return f"{P}lot:{lot_id}:vh:{salt}"


def _built_key(lot_id: str) -> str:
    return f"{P}lot:{lot_id}:built"


LOTS = f"{P}snapshot:lots"


def lot_kdf(r: redis.Redis, lot_id: str) -> Kdf:
    """The car park's salt, drawn at its first snapshot."""
    salt = r.get(_salt_key(lot_id))
    if salt is None:
        r.set(_salt_key(lot_id), secrets.token_hex(SALT_BYTES), nx=True)
        r.sadd(LOTS, lot_id)
        salt = r.get(_salt_key(lot_id))
    return Kdf(salt=str(salt))


def rotate_salt(r: redis.Redis, lot_id: str) -> Kdf:
    """A new salt for the car park: its next snapshot is a new version, hashed afresh (the
    version counter is the city's, so every car park fetches once more; only this one
    re-hashes)."""
    old = r.get(_salt_key(lot_id))
    salt = secrets.token_hex(SALT_BYTES)
    pipe = r.pipeline(transaction=True)
    pipe.set(_salt_key(lot_id), salt)
    pipe.sadd(LOTS, lot_id)
    if old is not None:
        pipe.delete(_cache_key(lot_id, str(old)))
    pipe.delete(_built_key(lot_id))
    pipe.incr(f"{P}eligible:version")
    pipe.execute()
    log.info("connector.eligibility_salt_rotated", lot_id=lot_id)
    return Kdf(salt=salt)


def current_version(r: redis.Redis) -> int:
    return int(r.get(f"{P}eligible:version") or 0)


def build(rt: Runtime, lot_id: str, budget_s: float = REQUEST_BUDGET_S) -> Built:
    """The car park's snapshot of the city's eligible vehicles now, hashing at most
    `budget_s` worth of vehicles not hashed for it before."""
    r = rt.redis
    kdf = lot_kdf(r, lot_id)
    cache_key = _cache_key(lot_id, kdf.salt)
    version, members = state.eligibility(r)  # {ref → encrypted plate}
    if r.get(_built_key(lot_id)) == f"{version}:{kdf.salt}":
        # Complete for this version already: the cache holds exactly the eligible set.
        return Built(version, kdf, sorted(r.hvals(cache_key)), True)  # type: ignore[arg-type]
    wanted = members
    cache: dict[str, str] = r.hgetall(cache_key)  # type: ignore[assignment]
    gone = [ref for ref in cache if ref not in wanted]
    computed: dict[str, str] = {}
    deadline = time.monotonic() + budget_s
    for ref, member in wanted.items():
        if ref in cache:
            continue
        if time.monotonic() >= deadline:
            break
        # Only a vehicle not hashed for this car park before is decrypted.
        computed[ref] = kdf.hash(*state.eligible_vehicle(rt.settings, member))
    hashes = sorted(
        cache.get(ref) or computed[ref] for ref in wanted if ref in cache or ref in computed
    )
    complete = len(hashes) == len(wanted)
    pipe = r.pipeline(transaction=False)
    if computed:
        pipe.hset(cache_key, mapping=computed)
    if gone:
        pipe.hdel(cache_key, *gone)
    pipe.expire(cache_key, CACHE_TTL_S)
    if complete:
        pipe.set(_built_key(lot_id), f"{version}:{kdf.salt}", ex=CACHE_TTL_S)
    pipe.execute()
    if computed:
        log.info(
            "connector.eligibility_hashed",
            lot_id=lot_id,
            hashed=len(computed),
            complete=complete,
            version=version,
        )
    return Built(version, kdf, hashes, complete)


def warm(rt: Runtime, budget_s: float) -> int:
    """Bring every car park's cache up to the city's eligible set, within `budget_s` in all;
    how many car parks still lag behind."""
    deadline = time.monotonic() + budget_s
    version = current_version(rt.redis)
    behind = 0
    for lot_id in sorted(rt.redis.smembers(LOTS)):  # type: ignore[arg-type]
        salt = rt.redis.get(_salt_key(str(lot_id)))
        if rt.redis.get(_built_key(str(lot_id))) == f"{version}:{salt}":
            continue
        left = deadline - time.monotonic()
        if left <= 0 or not build(rt, str(lot_id), left).complete:
            behind += 1
    return behind


def warmer(
    rt: Runtime, *, budget_s: float = 5.0, idle_s: float = 2.0
) -> Callable[[threading.Event], None]:
    """A gateway worker: hashes newly eligible vehicles for every post-pay car park in the
    background, so that requests rarely have to."""

    def run(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                behind = warm(rt, budget_s)
            except Exception:  # Redis away: try again later, the requests still build
                log.warning("connector.eligibility_warm_failed", exc_info=True)
                behind = 0
            if not behind:
                stop.wait(idle_s)

    return run
