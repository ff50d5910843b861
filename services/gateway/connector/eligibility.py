"""Eligibility snapshots a car park cannot turn back into plates (docs/privacy.md).

Every post-pay car park gets, for each vehicle allowed to leave on post-pay, a memory-hard
salted hash: scrypt("<plate>:<plate_color>", salt=<its scope's salt>, n, r, p). The salt is
random per salt scope and sent with the snapshot, so the gate can hash the plate in front of it
once (~27 ms) and look it up, while reversing the list costs one such hash per candidate plate
per salt: no precomputed table and no cheap GPU search (16 MiB per hash) help.

The salt scope (`eligibility_salt_scope`) is the district by default, or each car park. Every
snapshot lists the same city-wide set, so a salt per car park makes no list harder to reverse
than a salt per district, while it multiplies the gateway's hashing by the car parks of a
district: with Suzhou's 3,271 car parks and 324,000 drivers a salt per car park would be about
330 CPU-days of hashing, a salt per district about a CPU-day (docs/privacy.md).

What the gateway keeps (all under `citypark:gw:`):
  lot:<scope>:salt      → the scope's salt (hex); rotating it is a new snapshot version
  lot:<scope>:vh:<salt> → hash {vehicle pseudonym (`shared.pii.plate_ref`) → salted hash}:
                          the cache, so that a vehicle newly eligible costs one hash per salt
                          scope and a vehicle that stays costs nothing
  lot:<scope>:built     → "<version>:<salt>" of the last complete build, the fast path
  snapshot:lots       → salt scopes (a car park's id or `district:<code>`), kept up to date
                        by the warmer

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
from shared.settings import Settings

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


def salt_scope(settings: Settings, lot_id: str, district: str) -> str:
    """Whose salt a car park's snapshot is hashed with: its district's or its own."""
    if settings.eligibility_salt_scope == "lot":
        return lot_id
    return f"district:{district}"


def _salt_key(scope: str) -> str:
    return f"{P}lot:{scope}:salt"


def _cache_key(scope: str, salt: str) -> str:
    return f"{P}lot:{scope}:vh:{salt}"


def _built_key(scope: str) -> str:
    return f"{P}lot:{scope}:built"


LOTS = f"{P}snapshot:lots"


def lot_kdf(r: redis.Redis, scope: str) -> Kdf:
    """The car park's salt, drawn at its first snapshot."""
    salt = r.get(_salt_key(scope))
    if salt is None:
        r.set(_salt_key(scope), secrets.token_hex(SALT_BYTES), nx=True)
        r.sadd(LOTS, scope)
        salt = r.get(_salt_key(scope))
    return Kdf(salt=str(salt))


def rotate_salt(r: redis.Redis, scope: str) -> Kdf:
    """A new salt for the car park: its next snapshot is a new version, hashed afresh (the
    version counter is the city's, so every car park fetches once more; only this one
    re-hashes)."""
    old = r.get(_salt_key(scope))
    salt = secrets.token_hex(SALT_BYTES)
    pipe = r.pipeline(transaction=True)
    pipe.set(_salt_key(scope), salt)
    pipe.sadd(LOTS, scope)
    if old is not None:
        pipe.delete(_cache_key(scope, str(old)))
    pipe.delete(_built_key(scope))
    pipe.incr(f"{P}eligible:version")
    pipe.execute()
    log.info("connector.eligibility_salt_rotated", scope=scope)
    return Kdf(salt=salt)


def current_version(r: redis.Redis) -> int:
    return int(r.get(f"{P}eligible:version") or 0)


def build(rt: Runtime, scope: str, budget_s: float = REQUEST_BUDGET_S) -> Built:
    """The car park's snapshot of the city's eligible vehicles now, hashing at most
    `budget_s` worth of vehicles not hashed for it before."""
    r = rt.redis
    kdf = lot_kdf(r, scope)
    cache_key = _cache_key(scope, kdf.salt)
    version, members = state.eligibility(r)  # {ref → encrypted plate}
    if r.get(_built_key(scope)) == f"{version}:{kdf.salt}":
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
        pipe.set(_built_key(scope), f"{version}:{kdf.salt}", ex=CACHE_TTL_S)
    pipe.execute()
    if computed:
        log.info(
            "connector.eligibility_hashed",
            scope=scope,
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
    for scope in sorted(rt.redis.smembers(LOTS)):  # type: ignore[arg-type]
        salt = rt.redis.get(_salt_key(str(scope)))
        if rt.redis.get(_built_key(str(scope))) == f"{version}:{salt}":
            continue
        left = deadline - time.monotonic()
        if left <= 0 or not build(rt, str(scope), left).complete:
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
