"""Rebuilding the gate state from the services' own records when Redis has lost it.

The marker `citypark:gw:gate:marker` (a hash) says what Redis holds:
  lost_at   ms since the epoch when a gateway found the marker missing (Redis lost its data,
            or this is its first start); signatures created before that second are refused,
            since the nonces that would have caught their replay went with the data
  built_at  ms when the last complete rebuild finished; missing while one is due or running
  drivers, sessions, took_ms   what that rebuild wrote and how long it took
  layout    the key layout it wrote (state.LAYOUT); a marker naming another one (or none)
            counts as incomplete, so after an upgrade every gateway rebuilds at start

Every gateway checks the marker every few seconds and at start; whoever finds it missing
records `lost_at` and rebuilds. `citypark gate rebuild` does the same on demand. Keys are
overwritten in place, never cleared first, so a driver who is enrolled never reads as
`not_enrolled` because of a rebuild; `built_at` is written last, and only if no new loss
happened meanwhile. Drivers are applied with the events' own newer-version-wins rule, so an
account event consumed during the rebuild is never undone by the older snapshot. A rebuild
also deletes the keys an earlier layout left behind (plates in clear: state.py).
"""

from __future__ import annotations

import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import redis
import structlog

from services.gateway.gate.state import (
    LAYOUT,
    OpenSession,
    P,
    apply_accounts,
    is_ref,
    restore_open,
)
from shared.events import AccountUpdated
from shared.runtime import Runtime, Worker

log = structlog.get_logger(__name__)

MARKER = f"{P}gate:marker"
LOCK = f"{P}gate:rebuilding"
CHECK_INTERVAL_S = 2.0  # how soon a running gateway notices that Redis lost its data
LOCK_TTL_S = 30  # a rebuilder that died frees the way for another after this long
PAGE_SIZE = 2000
MAX_BACKOFF_S = 30.0

# Progress: (phase, done so far, total or None when not known yet).
Progress = Callable[[str, int, int | None], None]


class RebuildSuperseded(Exception):
    """Redis lost its data again while we rebuilt: what we wrote is incomplete."""


class RebuildBusy(Exception):
    """Another gateway (or `citypark gate rebuild`) is rebuilding right now."""


@dataclass(frozen=True)
class RebuildResult:
    drivers: int  # driver snapshots read from billing
    applied: int  # of which newer than what Redis held
    vehicles: int
    sessions: int  # open sessions read from the sessions service
    restored: int  # of which Redis did not have
    seconds: float
    lost_at_ms: int

    def summary(self) -> str:
        rate = self.vehicles / self.seconds if self.seconds > 0 else 0.0
        return (
            f"gate state rebuilt: {self.drivers} drivers ({self.applied} updated), "
            f"{self.vehicles} vehicles, {self.sessions} open sessions ({self.restored} restored) "
            f"in {self.seconds:.2f} s ({rate:,.0f} vehicles/s)"
        )


def now_ms() -> int:
    return int(time.time() * 1000)


def notice(r: redis.Redis) -> tuple[int, bool]:
    """The instant (ms) the current data's loss was noticed, recording now if the marker is
    missing; and whether this call is the one that recorded it."""
    pipe = r.pipeline(transaction=False)
    pipe.hsetnx(MARKER, "lost_at", now_ms())
    pipe.hget(MARKER, "lost_at")
    created, lost_at = pipe.execute()
    if created:
        log.warning("gate.state_missing", lost_at=_iso(int(lost_at)))
    _seen.add(r)
    return int(lost_at), bool(created)


def is_complete(r: redis.Redis) -> bool:
    """The cheap periodic check: one HMGET. Built for an earlier layout counts as not built."""
    built_at, layout = r.hmget(MARKER, "built_at", "layout")
    if built_at is not None:
        _seen.add(r)
    return built_at is not None and layout == LAYOUT


# Redis clients of this process that have seen the marker: if it is missing for one of
# them now, Redis lost its data under a running gateway, and the request that finds out
# records the loss at once instead of waiting for the next periodic check.
_seen: weakref.WeakSet[redis.Redis] = weakref.WeakSet()


def lost_at_for_request(r: redis.Redis, lost_at: str | None) -> int | None:
    """The loss instant (ms) a signature must not predate, given the marker's `lost_at` as
    read with the request's nonce; None while this process has no evidence of a loss."""
    if lost_at is not None:
        _seen.add(r)
        return int(lost_at)
    if r in _seen:
        return notice(r)[0]
    return None


def marker(r: redis.Redis) -> dict[str, str]:
    return r.hgetall(MARKER)  # type: ignore[return-value]


def rebuild(
    rt: Runtime,
    *,
    progress: Progress | None = None,
    wait_s: float = 0.0,
    page_size: int = PAGE_SIZE,
) -> RebuildResult:
    """Rebuild the gate state from billing's drivers and the sessions service's open sessions.

    Raises `RebuildBusy` if another rebuild holds the lock for longer than `wait_s`,
    `RebuildSuperseded` if Redis lost its data again meanwhile, and the internal client's
    errors if a service cannot be reached."""
    r = rt.redis
    token = secrets.token_hex(8)
    deadline = time.monotonic() + wait_s
    while not r.set(LOCK, token, nx=True, ex=LOCK_TTL_S):
        if time.monotonic() >= deadline:
            raise RebuildBusy("another rebuild of the gate state is running")
        time.sleep(0.2)
    try:
        return _rebuild_locked(rt, token, progress or (lambda *_: None), page_size)
    finally:
        _release(r, token)


def _rebuild_locked(rt: Runtime, token: str, progress: Progress, page_size: int) -> RebuildResult:
    r = rt.redis
    started = time.monotonic()
    lost_at, _ = notice(r)
    earlier = r.hget(MARKER, "layout") != LAYOUT  # an upgrade: plates may be left in clear

    def keep_lock() -> None:
        r.set(LOCK, token, xx=True, ex=LOCK_TTL_S)

    drivers = applied = vehicles = 0
    for page, total in _pages(rt, "billing", "/internal/billing/gate/accounts", page_size):
        snapshots = [AccountUpdated.opened(rt.settings, item) for item in page]
        applied += apply_accounts(r, rt.settings, snapshots)
        drivers += len(snapshots)
        vehicles += sum(len(s.vehicles) for s in snapshots)
        progress("drivers", drivers, total)
        keep_lock()
    sessions = restored = 0
    now = datetime.now(UTC)
    for page, total in _pages(rt, "sessions", "/internal/sessions/gate/open", page_size):
        open_now = [
            OpenSession(
                session_id=str(item["session_id"]),
                lot_id=str(item["lot_id"]),
                plate=str(item["plate"]),
                plate_color=str(item["plate_color"]),
                entered_at=datetime.fromisoformat(str(item["entered_at"])),
            )
            for item in page
        ]
        restored += restore_open(r, rt.settings, open_now, now=now)
        sessions += len(open_now)
        progress("sessions", sessions, total)
        keep_lock()
    purged = purge_earlier_layout(r) if earlier else 0
    seconds = time.monotonic() - started
    if int(r.get(f"{P}eligible:version") or 0) < lost_at:
        # After a loss the counter starts again near 0, and an ETag a car park kept from
        # before could match a different list: jump past every version handed out so far.
        r.set(f"{P}eligible:version", now_ms())
    _complete(r, lost_at, drivers=drivers, sessions=sessions, took_ms=int(seconds * 1000))
    result = RebuildResult(drivers, applied, vehicles, sessions, restored, seconds, lost_at)
    log.info(
        "gate.rebuilt",
        drivers=drivers,
        applied=applied,
        vehicles=vehicles,
        sessions=sessions,
        restored=restored,
        purged=purged,
        seconds=round(seconds, 3),
    )
    return result


# What layout 1 keyed by "<plate>:<color>" in clear; layout 2 writes a pseudonym there.
_EARLIER = ("vehicle:*", "claims:*", "open:*", "entered:*")


def purge_earlier_layout(r: redis.Redis, batch: int = 1000) -> int:
    """Delete the keys an earlier layout wrote with plates in them; how many. Run after the
    drivers and open sessions were written anew (nothing reads these any more)."""
    doomed: list[str] = []
    for pattern in _EARLIER:
        for key in r.scan_iter(match=f"{P}{pattern}", count=batch):
            if not is_ref(str(key).rpartition(":")[2]):
                doomed.append(str(key))
    sets = [
        str(key)
        for key in r.scan_iter(match=f"{P}driver:*", count=batch)
        if str(key).endswith((":vehicles", ":claims"))
    ]
    for start in range(0, len(sets), batch):
        pipe = r.pipeline(transaction=False)
        for key in sets[start : start + batch]:
            pipe.smembers(key)
        for key, members in zip(sets[start : start + batch], pipe.execute(), strict=True):
            if not all(is_ref(str(m)) for m in members):
                doomed.append(key)
    if r.type(f"{P}eligible") != "none":
        doomed.append(f"{P}eligible")
    # The pass holders of each car park (connector/passes.py) were plates in clear too.
    doomed += [str(k) for k in r.scan_iter(match=f"{P}passes:*:holders", count=batch)]
    for start in range(0, len(doomed), batch):
        r.delete(*doomed[start : start + batch])
    if doomed:
        log.info("gate.earlier_layout_purged", keys=len(doomed))
    return len(doomed)


def _pages(
    rt: Runtime, service: str, path: str, page_size: int
) -> Iterator[tuple[list[dict[str, Any]], int | None]]:
    """The service's records page by page; the next page is fetched while the caller
    writes this one, so the service's time and Redis's time overlap."""

    def fetch(after: str | None) -> dict[str, Any]:
        query = {"limit": page_size} | ({"after": after} if after else {})
        # Looked up on every page: a test (or an operator) may swap the client meanwhile.
        answer: dict[str, Any] = rt.internal(service).call("GET", f"{path}?{urlencode(query)}")
        return answer

    total: int | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate-rebuild") as pool:
        coming = pool.submit(fetch, None)
        while True:
            answer = coming.result()
            after = answer.get("next")
            if after:
                coming = pool.submit(fetch, after)
            if answer.get("total") is not None:
                total = int(answer["total"])
            if answer["items"]:
                yield answer["items"], total
            if not after:
                return


def _complete(r: redis.Redis, lost_at: int, **figures: int | str) -> None:
    """Write `built_at`, but only if the marker still records the loss we rebuilt for."""
    with r.pipeline(transaction=True) as pipe:
        pipe.watch(MARKER)
        if pipe.hget(MARKER, "lost_at") != str(lost_at):
            pipe.unwatch()
            raise RebuildSuperseded("Redis lost its data again during the rebuild")
        pipe.multi()
        figures["built_at"] = now_ms()
        figures["layout"] = LAYOUT
        pipe.hset(MARKER, mapping=figures)  # type: ignore[arg-type]
        try:
            pipe.execute()
        except redis.WatchError as exc:
            raise RebuildSuperseded("Redis lost its data again during the rebuild") from exc


def _release(r: redis.Redis, token: str) -> None:
    with r.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(LOCK)
            if pipe.get(LOCK) == token:
                pipe.multi()
                pipe.delete(LOCK)
                pipe.execute()
            else:
                pipe.unwatch()
        except redis.WatchError:
            pass  # taken over meanwhile: not ours to delete


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def keeper(rt: Runtime, interval_s: float = CHECK_INTERVAL_S) -> Worker:
    """The gateway's watch over its state: at start and every `interval_s`, rebuild if due."""

    def run(stop: threading.Event) -> None:
        delay = interval_s
        while not stop.is_set():
            try:
                if not is_complete(rt.redis):
                    notice(rt.redis)
                    rebuild(rt)
                delay = interval_s
            except (RebuildBusy, RebuildSuperseded) as exc:
                # Someone else is at it, or Redis emptied again meanwhile: check again soon.
                log.info("gate.rebuild_deferred", reason=str(exc))
                delay = interval_s
            except Exception as exc:  # a service or Redis away: try again, less often
                delay = min(delay * 2, MAX_BACKOFF_S)
                log.warning("gate.rebuild_failed", error=repr(exc), retry_in_s=delay)
            stop.wait(delay)

    return run
