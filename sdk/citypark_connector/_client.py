"""The connector client: signed requests, a durable outbox, retries, offline gate decisions.

`entry()` and `exit()` write the event to the local outbox first and only then send it, so a
crash, a power cut or an outage never loses one; a background worker replays what is left, in
order, through `/v1/connector/batches`. `exit()` answers within a hard deadline: when the city
is slow or away, it decides from the last eligibility snapshot and says so (`offline=True`);
the replay of that exit carries the decision (`offline_decision`), so that the city honours
a post-pay the gate promised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ._outbox import EventState, Outbox, OutboxEvent
from ._passes import PASSES, PassEntry, PassKind, covering_reason, pass_body
from ._plates import SnapshotKdf, plate_hash
from ._signing import SignatureAuth
from ._version import __version__

PlateColor = Literal["blue", "yellow", "green", "white", "black"]
VehicleType = Literal["small", "large"]

log = logging.getLogger("citypark_connector")

_REQUEST_ID_HEADER = "x-request-id"
ENTRIES = "/v1/connector/entries"
EXITS = "/v1/connector/exits"
BATCHES = "/v1/connector/batches"
ELIGIBILITY = "/v1/connector/eligibility"
SNAPSHOT_FORMAT = 2  # vehicles hashed with the car park's salt (1: unsalted sha256, dropped)
MAX_BATCH = 500  # the city's limit per batch (SPEC §4)
CLAIM_WAIT_S = 2.0  # how long a repeated event id waits for the call still holding it
_SNAPSHOT_META = "eligibility"
# 4xx answers that say nothing about the event itself: a key being rotated (401/403), a
# request timing out (408), a concurrent delivery (409/425), or the lot's rate limit (429).
# The event stays pending; every other 4xx is a verdict on the event and quarantines it.
_RETRYABLE_4XX = frozenset({401, 403, 408, 409, 425, 429})


class ConnectorError(Exception):
    """CityPark answered 4xx/5xx; `code` is the stable problem code (e.g. `signature_invalid`)."""

    def __init__(
        self,
        http_status: int,
        code: str,
        detail: str,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.http_status = http_status
        self.code = code
        self.detail = detail
        self.request_id = request_id
        self.retry_after = retry_after
        super().__init__(f"{http_status} {code}: {detail}")


class EventRejected(ConnectorError):
    """The city refused the event for good (e.g. `plate_invalid`); the outbox keeps it as
    `rejected` with the problem, for the operator to inspect (`citypark-connector outbox list`)."""


@dataclass(frozen=True)
class EntryResult:
    event_id: str
    # "accepted"; "duplicate" when the city had it already; "queued" when it is in the outbox
    # and will be delivered by the background worker.
    status: str


@dataclass(frozen=True)
class Decision:
    """The exit gate's answer. `offline` when it came from the local snapshot, not the city."""

    event_id: str
    decision: str  # "postpay", "pay_on_site" or "free"
    reason: str | None
    session_id: str | None
    offline: bool = False


ExitResult = Decision


@dataclass(frozen=True)
class Snapshot:
    """Vehicles allowed to leave on post-pay, each hashed with this car park's salt (`kdf`):
    the gate hashes the plate in front of it once and looks it up."""

    version: int
    fetched_at: float
    lot_postpay_enabled: bool
    vehicles: frozenset[str] = field(repr=False)
    etag: str | None = None
    # The lot's live passes: a covered stay leaves `free` offline too.
    passes: tuple[PassEntry, ...] = field(default=(), repr=False)
    # None for a car park without post-pay (no vehicles either).
    kdf: SnapshotKdf | None = None


@dataclass(frozen=True)
class _Outcome:
    verdict: Literal["delivered", "rejected", "failed"]
    answer: dict[str, Any] | None = None
    error: ConnectorError | None = None


class _Backoff:
    """Exponential backoff with equal jitter, shared by all sends: it is the uplink that is
    down, not one event. A `Retry-After` from the city is a floor."""

    def __init__(self, base_s: float, cap_s: float, rng: random.Random) -> None:
        self.base_s, self.cap_s, self._rng = base_s, cap_s, rng
        self.failures = 0
        self.next_at = 0.0
        self._lock = threading.Lock()

    def ready(self) -> bool:
        return time.monotonic() >= self.next_at

    def remaining(self) -> float:
        return max(0.0, self.next_at - time.monotonic())

    def failed(self, retry_after: float | None = None) -> float:
        with self._lock:
            self.failures += 1
            ceiling = min(self.cap_s, self.base_s * 2 ** min(self.failures - 1, 30))
            delay = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
            if retry_after is not None:
                delay = max(delay, retry_after)
            self.next_at = time.monotonic() + delay
            return delay

    def succeeded(self) -> None:
        with self._lock:
            self.failures = 0
            self.next_at = 0.0


class ConnectorClient:
    """A car park's connection to CityPark: every request signed with the lot's Ed25519 key.

    `outbox_path` is the SQLite file that makes events durable; without it events are kept in
    memory only (fine for tests and tools, not for a gate). The background worker starts with
    the first `entry()`/`exit()` (or `start()`) and stops on `close()`.
    """

    def __init__(
        self,
        key_id: str,
        private_key: str | Ed25519PrivateKey,
        *,
        base_url: str,
        timeout: float = 10.0,
        outbox_path: str | Path | None = None,
        exit_deadline: float = 0.8,
        entry_deadline: float = 2.0,
        eligibility_refresh_s: float = 60.0,
        snapshot_max_age_s: float = 24 * 3600.0,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 60.0,
        batch_size: int = MAX_BATCH,
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}")
        self.key_id = key_id
        self.base_url = base_url
        self.timeout = timeout
        self.exit_deadline = exit_deadline
        self.entry_deadline = entry_deadline
        self.eligibility_refresh_s = eligibility_refresh_s
        self.snapshot_max_age_s = snapshot_max_age_s
        self.batch_size = batch_size
        self._auth = SignatureAuth(key_id, private_key)
        headers = {"user-agent": f"citypark-connector/{__version__}"}
        self._http = httpx.Client(
            base_url=base_url,
            timeout=timeout,
            auth=self._auth,
            transport=transport,
            headers=headers,
        )
        self._async_transport = async_transport
        self._ahttp: httpx.AsyncClient | None = None
        self.outbox = Outbox(":memory:" if outbox_path is None else outbox_path)
        self._backoff = _Backoff(backoff_base_s, backoff_cap_s, rng or random.Random())
        self._inflight: set[str] = set()
        self._inflight_lock = threading.Lock()
        self._released = threading.Condition(self._inflight_lock)
        # Exits this process decided offline whose first send may still be answered late.
        self._decided_offline: dict[str, str] = {}
        self._bare: set[str] = set()  # exits whose offline_decision the city refused
        self._flush_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._worker: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        self._lookup_s = 0.0  # what one offline look-up costs here, measured per snapshot
        self._snapshot = self._load_snapshot()
        self._next_refresh = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start the background worker (replay of the backlog, eligibility refresh)."""
        with self._start_lock:
            if self._worker is None and not self._stop.is_set():
                self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="citypark-send")
                self._worker = threading.Thread(
                    target=self._run, name="citypark-connector", daemon=True
                )
                self._worker.start()

    def close(self) -> None:
        """Stop the worker and close connections. Pending events stay in the outbox."""
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=self.timeout + 5)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()
        self.outbox.close()

    async def aclose(self) -> None:
        if self._ahttp is not None:
            await self._ahttp.aclose()
        await asyncio.to_thread(self.close)

    # -- gate events through the outbox ------------------------------------------------------

    def entry(
        self,
        *,
        plate: str,
        plate_color: PlateColor | str,
        vehicle_type: VehicleType = "small",
        lane: str = "",
        occurred_at: datetime | None = None,
        event_id: uuid.UUID | str | None = None,
    ) -> EntryResult:
        """Record a vehicle entering. Durable on return; sent now, or later if the city is away.

        Raises `EventRejected` when the city refuses the event itself (e.g. `plate_invalid`)."""
        event, known = self._store(
            "entry", _entry_body(event_id, occurred_at, plate, plate_color, vehicle_type, lane)
        )
        if known is not None:
            return known  # type: ignore[return-value]
        self.start()
        if not self._may_send_now(event):
            self._release([event.event_id])
            self._wake.set()
            return EntryResult(event.event_id, "queued")
        outcome = self._send_with_deadline(event, ENTRIES, self.entry_deadline)
        return self._entry_result(event, outcome)

    def exit(
        self,
        *,
        plate: str,
        plate_color: PlateColor | str,
        lane: str = "",
        occurred_at: datetime | None = None,
        event_id: uuid.UUID | str | None = None,
    ) -> Decision:
        """Record a vehicle at the exit gate and decide within `exit_deadline` seconds.

        The city's answer when it comes in time; otherwise a decision from the local
        eligibility snapshot, marked `offline=True` (the exit is delivered later all the same).
        """
        event, known = self._store(
            "exit", _exit_body(event_id, occurred_at, plate, plate_color, lane)
        )
        if known is not None:
            return known  # type: ignore[return-value]
        self.start()
        # While the city is known to be away, decide at once: a car should not wait 800 ms
        # for an answer that is not coming.
        outcome = None
        if self._backoff.ready():
            outcome = self._send_with_deadline(event, EXITS, self._online_wait())
        else:
            self._release([event.event_id])
        return self._exit_result(event, outcome)

    async def entry_async(
        self,
        *,
        plate: str,
        plate_color: PlateColor | str,
        vehicle_type: VehicleType = "small",
        lane: str = "",
        occurred_at: datetime | None = None,
        event_id: uuid.UUID | str | None = None,
    ) -> EntryResult:
        """`entry()` for asyncio code."""
        body = _entry_body(event_id, occurred_at, plate, plate_color, vehicle_type, lane)
        event, known = await asyncio.to_thread(self._store, "entry", body)
        if known is not None:
            return known  # type: ignore[return-value]
        self.start()
        if not self._may_send_now(event):
            self._release([event.event_id])
            self._wake.set()
            return EntryResult(event.event_id, "queued")
        outcome = await self._send_async(event, ENTRIES, self.entry_deadline)
        return self._entry_result(event, outcome)

    async def exit_async(
        self,
        *,
        plate: str,
        plate_color: PlateColor | str,
        lane: str = "",
        occurred_at: datetime | None = None,
        event_id: uuid.UUID | str | None = None,
    ) -> Decision:
        """`exit()` for asyncio code, with the same hard deadline."""
        body = _exit_body(event_id, occurred_at, plate, plate_color, lane)
        event, known = await asyncio.to_thread(self._store, "exit", body)
        if known is not None:
            return known  # type: ignore[return-value]
        self.start()
        outcome = None
        if self._backoff.ready():
            outcome = await self._send_async(event, EXITS, self._online_wait())
        else:
            self._release([event.event_id])
        return await asyncio.to_thread(self._exit_result, event, outcome)

    def pending(self) -> int:
        """Events written but not yet acknowledged by the city."""
        return self.outbox.count(EventState.pending)

    def flush(self, timeout: float = 30.0) -> int:
        """Deliver the backlog now, waiting out backoff, for at most `timeout` seconds.

        Returns how many events are still pending (0 when all were delivered or rejected)."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.pending()
            if left == 0 or time.monotonic() >= deadline:
                return left
            if not self._backoff.ready():
                time.sleep(min(self._backoff.remaining(), max(0.0, deadline - time.monotonic())))
                continue
            if self._flush_once() == 0 and self._backoff.ready():
                time.sleep(0.05)  # the rest is in flight on another thread

    async def flush_async(self, timeout: float = 30.0) -> int:
        return await asyncio.to_thread(self.flush, timeout)

    def _online_wait(self) -> float:
        """How long an exit waits for the city: the deadline less what hashing the plate for
        the offline look-up takes (twice the measured cost), so the gate still decides within
        `exit_deadline` when the city does not answer."""
        return max(self.exit_deadline - 2 * self._lookup_s, self.exit_deadline / 2)

    # -- eligibility snapshot ------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def refresh_eligibility(self) -> Snapshot:
        """Fetch the city's eligibility snapshot now (only when its version changed)."""
        current = self._snapshot
        headers = {"if-none-match": current.etag} if current and current.etag else {}
        response = self._http.get(ELIGIBILITY, headers=headers)
        now = time.time()
        if response.status_code == 304 and current is not None:
            snap = Snapshot(
                current.version,
                now,
                current.lot_postpay_enabled,
                current.vehicles,
                current.etag,
                current.passes,
                current.kdf,
            )
        else:
            if response.is_error:
                raise _error_from(response)
            data = _json_object(response)
            if data.get("format") != SNAPSHOT_FORMAT:
                # The unsalted format 1 is no longer served; the snapshot in hand stays in use.
                raise ValueError(f"eligibility snapshot format {data.get('format')!r} unknown")
            if data.get("complete") is False and current is not None:
                # The city is still hashing newly eligible vehicles: the complete snapshot in
                # hand decides better than a partial one, which would send enrolled drivers to
                # pay at the gate. Asked again at the next refresh.
                log.info(
                    "citypark: eligibility snapshot %s still being built; keeping %s",
                    data.get("version"),
                    current.version,
                )
                return current
            kdf = data.get("kdf")
            snap = Snapshot(
                version=int(data["version"]),
                fetched_at=now,
                lot_postpay_enabled=bool(data.get("lot_postpay_enabled", True)),
                vehicles=frozenset(str(v) for v in data["vehicles"]),
                etag=response.headers.get("etag"),
                passes=tuple(PassEntry.parse(p) for p in data.get("passes") or ()),
                kdf=None if kdf is None else SnapshotKdf.parse(kdf),
            )
            self._lookup_s = _lookup_cost(snap)
        self._snapshot = snap
        self.outbox.set_meta(
            _SNAPSHOT_META,
            json.dumps(
                {
                    "version": snap.version,
                    "fetched_at": snap.fetched_at,
                    "lot_postpay_enabled": snap.lot_postpay_enabled,
                    "vehicles": sorted(snap.vehicles),
                    "etag": snap.etag,
                    "passes": [p.dump() for p in snap.passes],
                    "format": SNAPSHOT_FORMAT,
                    "kdf": None if snap.kdf is None else snap.kdf.dump(),
                }
            ),
        )
        return snap

    def offline_decision(
        self,
        plate: str,
        plate_color: str,
        *,
        at: datetime | None = None,
        entered_at: datetime | None = None,
    ) -> tuple[str, str]:
        """`(decision, reason)` from the snapshot alone, as the gate decides without the city.

        `free` when the snapshot's passes cover the stay from `entered_at` (if known) to `at`
        (the exit, default now); without the entry only the exit instant is judged."""
        return self._decide_offline(self._snapshot, plate, plate_color, at, entered_at)

    def _decide_offline(
        self,
        snap: Snapshot | None,
        plate: str,
        plate_color: str,
        at: datetime | None,
        entered_at: datetime | None,
    ) -> tuple[str, str]:
        if snap is None:
            return "pay_on_site", "offline_no_snapshot"
        stale = time.time() - snap.fetched_at > self.snapshot_max_age_s
        if not stale and snap.passes:
            exited = at or datetime.now(UTC)
            entered = entered_at if entered_at is not None and entered_at <= exited else exited
            vehicle = plate_hash(plate, plate_color)
            reason = covering_reason(snap.passes, vehicle, entered, exited)
            if reason is not None:
                return "free", reason
        if not snap.lot_postpay_enabled:
            return "pay_on_site", "lot_not_postpay"
        if stale:
            return "pay_on_site", "offline_snapshot_stale"
        # One memory-hard hash of this plate with the car park's salt (docs/gate.md).
        if snap.kdf is not None and snap.kdf.hash(plate, plate_color) in snap.vehicles:
            return "postpay", "enrolled"
        return "pay_on_site", "not_eligible"

    # -- direct calls (no outbox) ----------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> httpx.Response:
        """Send a signed request; raise `ConnectorError` on a 4xx/5xx answer."""
        response = self._http.request(method, path, json=json, params=params)
        if response.is_error:
            raise _error_from(response)
        return response

    def report_entry(
        self,
        *,
        plate: str,
        plate_color: PlateColor | str,
        vehicle_type: VehicleType,
        lane: str,
        occurred_at: datetime | None = None,
        event_id: uuid.UUID | str | None = None,
    ) -> EntryResult:
        """Send one entry right now, bypassing the outbox (tools, tests, re-deliveries)."""
        body = _entry_body(event_id, occurred_at, plate, plate_color, vehicle_type, lane)
        data = _json_object(self.request("POST", ENTRIES, json=body))
        return EntryResult(event_id=str(data["event_id"]), status=str(data["status"]))

    def report_exit(
        self,
        *,
        plate: str,
        plate_color: PlateColor | str,
        lane: str,
        occurred_at: datetime | None = None,
        event_id: uuid.UUID | str | None = None,
    ) -> Decision:
        """Send one exit right now, bypassing the outbox, and return the city's decision."""
        body = _exit_body(event_id, occurred_at, plate, plate_color, lane)
        return _decision(_json_object(self.request("POST", EXITS, json=body)), body["event_id"])

    def put_pass(
        self,
        pass_id: str,
        *,
        plate: str,
        plate_color: PlateColor | str,
        kind: PassKind,
        valid_from: datetime | date,
        valid_to: datetime | date,
        window: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create or replace a pass or whitelist entry (SPEC §10); the stored pass comes back,
        its `status` `created`, `updated` or `unchanged`. Safe to repeat after a failure.

        A date without a time is a whole day on the lot's clock (`valid_to` included);
        `window=("21:00", "07:00")` makes a night-only pass."""
        body = pass_body(
            plate=plate,
            plate_color=plate_color,
            kind=kind,
            valid_from=valid_from,
            valid_to=valid_to,
            window=window,
        )
        return _json_object(self.request("PUT", f"{PASSES}/{pass_id}", json=body))

    def delete_pass(self, pass_id: str) -> None:
        """Withdraw a pass. Repeating it is harmless; an unknown id raises `pass_unknown`."""
        self.request("DELETE", f"{PASSES}/{pass_id}")

    def heartbeat(self, *, free_spaces: int, total_spaces: int) -> None:
        """Report occupancy; also tells CityPark the connector is alive. Not queued: a
        heartbeat that cannot be sent now is stale by the next one."""
        self.request("POST", "/v1/connector/heartbeats", json=_heartbeat(free_spaces, total_spaces))

    async def heartbeat_async(self, *, free_spaces: int, total_spaces: int) -> None:
        response = await self._async_http().post(
            "/v1/connector/heartbeats", json=_heartbeat(free_spaces, total_spaces)
        )
        if response.is_error:
            raise _error_from(response)

    # -- internals ---------------------------------------------------------------------------

    def _store(
        self, kind: str, body: dict[str, Any]
    ) -> tuple[OutboxEvent, EntryResult | Decision | None]:
        """Write the event durably. For an `event_id` seen before, the answer it already has.

        A new event is claimed for this caller before it becomes visible in the outbox, so the
        background worker does not send it at the same time; the caller releases it."""
        event_id = str(body["event_id"])
        if not self._claim_waiting(event_id):
            raise RuntimeError(f"event {event_id} is being reported by another call right now")
        try:
            _, created = self.outbox.add(event_id, kind, body)
            event = self.outbox.get(event_id)
        except BaseException:
            self._release([event_id])
            raise
        assert event is not None
        if created:
            return event, None
        self._release([event_id])
        if event.state is EventState.rejected:
            raise _rejected(event.answer or {}, None)
        if kind == "entry":
            status = "duplicate" if event.state is EventState.delivered else "queued"
            return event, EntryResult(event_id, status)
        if event.state is EventState.delivered and event.answer is not None:
            return event, _decision(event.answer, event_id)
        if event.offline_decision is not None:
            return event, _offline_answer(event.offline_decision, event_id)
        # Stored by an earlier run that died before deciding: decide now.
        if not self._claim_waiting(event_id):
            raise RuntimeError(f"event {event_id} is being reported by another call right now")
        return event, None

    def _may_send_now(self, event: OutboxEvent) -> bool:
        """Entries keep their order: with older events waiting, this one queues behind them."""
        if not self._backoff.ready():
            return False
        with self._inflight_lock:
            inflight = list(self._inflight)
        return not self.outbox.pending_before(event.seq, exclude=inflight)

    def _claim(self, event_ids: list[str]) -> list[str]:
        with self._inflight_lock:
            free = [e for e in event_ids if e not in self._inflight]
            self._inflight.update(free)
            return free

    def _claim_waiting(self, event_id: str, timeout_s: float = CLAIM_WAIT_S) -> bool:
        """Claim one event, waiting a moment for another holder to let go: the background
        worker records an answer just before it releases the event, so a caller repeating
        that event id right then would otherwise be refused for nothing."""
        with self._released:
            if not self._released.wait_for(lambda: event_id not in self._inflight, timeout_s):
                return False
            self._inflight.add(event_id)
            return True

    def _release(self, event_ids: list[str]) -> None:
        with self._released:
            self._inflight.difference_update(event_ids)
            self._released.notify_all()

    def _send_with_deadline(
        self, event: OutboxEvent, path: str, deadline: float
    ) -> _Outcome | None:
        """Send one (claimed) event on a worker thread; `None` when no verdict came within
        `deadline`. A late answer is still recorded in the outbox when it arrives."""
        if self._pool is None:  # closed: the event waits in the outbox for the next run
            self._release([event.event_id])
            return None
        try:
            future = self._pool.submit(self._send_one, event, path)
        except RuntimeError:  # the client is closing
            self._release([event.event_id])
            return None
        try:
            return future.result(timeout=deadline)
        except FutureTimeout:
            self._wake.set()
            return None

    def _send_one(self, event: OutboxEvent, path: str) -> _Outcome:
        try:
            try:
                response = self._http.post(path, json=event.body)
            except httpx.HTTPError as exc:
                return self._record_failure([event.event_id], f"{type(exc).__name__}: {exc}")
            return self._record_answer(event, response)
        finally:
            self._release([event.event_id])

    async def _send_async(self, event: OutboxEvent, path: str, deadline: float) -> _Outcome | None:
        try:
            try:
                response = await asyncio.wait_for(
                    self._async_http().post(path, json=event.body), deadline
                )
            except (TimeoutError, httpx.HTTPError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                await asyncio.to_thread(self._record_failure, [event.event_id], error)
                self._wake.set()
                return None
            return await asyncio.to_thread(self._record_answer, event, response)
        finally:
            self._release([event.event_id])

    def _record_answer(self, event: OutboxEvent, response: httpx.Response) -> _Outcome:
        with self._inflight_lock:
            offline = self._decided_offline.pop(event.event_id, None)
        if response.is_success:
            answer = _json_object(response)
            self.outbox.mark_delivered([(event.event_id, answer)])
            self._backoff.succeeded()
            # An answer after the gate decided on its own: the city decided without knowing
            # what the gate had promised.
            _warn_if_broken(event.event_id, offline, answer)
            return _Outcome("delivered", answer=answer)
        error = _error_from(response)
        if _permanent(response.status_code):
            self.outbox.mark_rejected([(event.event_id, _problem_of(response, error))])
            return _Outcome("rejected", error=error)
        return self._record_failure([event.event_id], str(error), error.retry_after, error)

    def _record_failure(
        self,
        event_ids: list[str],
        message: str,
        retry_after: float | None = None,
        error: ConnectorError | None = None,
    ) -> _Outcome:
        self.outbox.mark_failed(event_ids, message)
        delay = self._backoff.failed(retry_after)
        if error is not None and error.http_status == 429:
            # The city pushing back is not a failure: the events wait in the outbox as asked.
            log.info(
                "citypark: the city asked to wait (%s); sending again in %.1f s", message, delay
            )
        else:
            log.warning("citypark: delivery failed (%s); retrying in %.1f s", message, delay)
        return _Outcome("failed", error=error)

    def _entry_result(self, event: OutboxEvent, outcome: _Outcome | None) -> EntryResult:
        if outcome is not None and outcome.verdict == "delivered" and outcome.answer:
            return EntryResult(event.event_id, str(outcome.answer.get("status", "accepted")))
        if outcome is not None and outcome.verdict == "rejected":
            assert outcome.error is not None
            raise _as_rejected(outcome.error)
        self._wake.set()
        return EntryResult(event.event_id, "queued")

    def _exit_result(self, event: OutboxEvent, outcome: _Outcome | None) -> Decision:
        if outcome is not None and outcome.verdict == "delivered" and outcome.answer:
            return _decision(outcome.answer, event.event_id)
        if outcome is not None and outcome.verdict == "rejected":
            assert outcome.error is not None
            raise _as_rejected(outcome.error)
        snap = self._snapshot
        decision, reason = self._decide_offline(
            snap,
            event.body["plate"],
            event.body["plate_color"],
            datetime.fromisoformat(event.body["occurred_at"]),
            None,
        )
        answer = Decision(event.event_id, decision, reason, None, offline=True)
        with self._inflight_lock:
            self._decided_offline[event.event_id] = decision  # for a late answer to the send
        # Kept for the replay, which tells the city what the gate promised so it can honour it.
        self.outbox.set_offline_decision(
            event.event_id,
            {
                "event_id": answer.event_id,
                "decision": answer.decision,
                "reason": answer.reason,
                "session_id": None,
                "offline": True,
                "eligibility_version": None if snap is None else snap.version,
                "decided_at": datetime.now(UTC).isoformat(),
            },
        )
        self._wake.set()
        log.info("citypark: offline exit decision %s (%s) for %s", decision, reason, event.event_id)
        return answer

    def _flush_once(self) -> int:
        """Send one batch of the oldest pending events; how many got a verdict."""
        with self._flush_lock:
            with self._inflight_lock:
                inflight = list(self._inflight)
            events = self.outbox.pending(self.batch_size, exclude=inflight)
            claimed = set(self._claim([e.event_id for e in events]))
            events = [e for e in events if e.event_id in claimed]
            if not events:
                return 0
            ids = [e.event_id for e in events]
            try:
                return self._send_batch(events)
            finally:
                self._release(ids)

    def _send_batch(self, events: list[OutboxEvent]) -> int:
        ids = [e.event_id for e in events]
        bare = {e.event_id for e in events if e.event_id in self._bare}
        payload = {"events": [_replay_item(e, e.event_id not in bare) for e in events]}
        try:
            response = self._http.post(BATCHES, json=payload)
        except httpx.HTTPError as exc:
            self._record_failure(ids, f"{type(exc).__name__}: {exc}")
            return 0
        if not response.is_success:
            error = _error_from(response)
            if _permanent(response.status_code):
                # The batch as a whole was refused: a verdict on these events' shape.
                problem = _problem_of(response, error)
                self.outbox.mark_rejected([(i, problem) for i in ids])
                return len(ids)
            self._record_failure(ids, str(error), error.retry_after, error)
            return 0
        data = _json_object(response)
        delivered: list[tuple[str, dict[str, Any]]] = []
        rejected: list[tuple[str, dict[str, Any]]] = []
        resend: list[str] = []
        for item in data.get("results", []):
            index = item.get("index")
            if not isinstance(index, int) or not 0 <= index < len(events):
                continue
            event_id = events[index].event_id
            refused = item.get("status") == "rejected"
            if refused and event_id not in bare and _offline_field_refused(item):
                resend.append(event_id)
            elif refused:
                rejected.append((event_id, {k: v for k, v in item.items() if v is not None}))
            else:
                delivered.append((event_id, item))
                promised = (events[index].offline_decision or {}).get("decision")
                _warn_if_broken(event_id, promised, item)
        with self._inflight_lock:
            for event_id in ids:
                self._decided_offline.pop(event_id, None)
            self._bare.difference_update(ids)
        self.outbox.mark_delivered(delivered)
        self.outbox.mark_rejected(rejected)
        if resend:
            # The exit itself must never be lost over what the gate decided (a city that
            # predates the field refuses it): send it again without.
            with self._inflight_lock:
                self._bare.update(resend)
            self.outbox.mark_failed(resend, "the city refused offline_decision")
            for event_id in resend:
                log.warning("citypark: offline_decision of %s refused; resending without", event_id)
        for event_id, problem in rejected:
            log.error("citypark: event %s rejected: %s", event_id, problem.get("code"))
        self._backoff.succeeded()
        return len(delivered) + len(rejected)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # the worker must survive anything one round throws
                log.exception("citypark: background worker round failed")
                self._backoff.failed()
            wait = min(
                1.0,
                self._backoff.remaining() or 1.0,
                max(0.05, self._next_refresh - time.monotonic()),
            )
            self._wake.wait(wait)
            self._wake.clear()

    def _tick(self) -> None:
        if time.monotonic() >= self._next_refresh:
            try:
                self.refresh_eligibility()
                self._next_refresh = time.monotonic() + self.eligibility_refresh_s
            except (httpx.HTTPError, ConnectorError, ValueError, KeyError) as exc:
                busy = isinstance(exc, ConnectorError) and exc.http_status == 429
                # The city asking to wait is not a failure: the snapshot in hand stays in use.
                (log.info if busy else log.warning)("citypark: eligibility refresh failed: %s", exc)
                wait = max(exc.retry_after or 1.0, 1.0) if busy else 15.0  # type: ignore[union-attr]
                self._next_refresh = time.monotonic() + min(wait, self.eligibility_refresh_s)
        while not self._stop.is_set() and self._backoff.ready() and self._flush_once() > 0:
            pass

    def _load_snapshot(self) -> Snapshot | None:
        raw = self.outbox.get_meta(_SNAPSHOT_META)
        if raw is None:
            return None
        data = json.loads(raw)
        if data.get("format") != SNAPSHOT_FORMAT:
            return None  # an unsalted snapshot of an older version: fetch a new one
        kdf = data.get("kdf")
        snap = Snapshot(
            version=int(data["version"]),
            fetched_at=float(data["fetched_at"]),
            lot_postpay_enabled=bool(data["lot_postpay_enabled"]),
            vehicles=frozenset(data["vehicles"]),
            etag=data.get("etag"),
            passes=tuple(PassEntry.parse(p) for p in data.get("passes") or ()),
            kdf=None if kdf is None else SnapshotKdf.parse(kdf),
        )
        self._lookup_s = _lookup_cost(snap)
        return snap

    def _async_http(self) -> httpx.AsyncClient:
        if self._ahttp is None:
            self._ahttp = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=self.timeout,
                auth=self._auth,
                transport=self._async_transport,
                headers={"user-agent": f"citypark-connector/{__version__}"},
            )
        return self._ahttp


def _lookup_cost(snap: Snapshot) -> float:
    """Seconds one offline look-up takes with this snapshot's hashing, on this machine."""
    if snap.kdf is None:
        return 0.0
    started = time.perf_counter()
    snap.kdf.hash("京A00000", "blue")
    return time.perf_counter() - started


def _permanent(status: int) -> bool:
    return 400 <= status < 500 and status not in _RETRYABLE_4XX


def _event_body(event_id: uuid.UUID | str | None, occurred_at: datetime | None) -> dict[str, Any]:
    when = datetime.now(UTC) if occurred_at is None else occurred_at
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("occurred_at must be timezone-aware (RFC 3339 needs an offset)")
    return {
        "event_id": str(uuid.uuid4() if event_id is None else uuid.UUID(str(event_id))),
        "occurred_at": when.isoformat(),
    }


def _entry_body(
    event_id: uuid.UUID | str | None,
    occurred_at: datetime | None,
    plate: str,
    plate_color: str,
    vehicle_type: str,
    lane: str,
) -> dict[str, Any]:
    return _event_body(event_id, occurred_at) | {
        "plate": plate,
        "plate_color": plate_color,
        "vehicle_type": vehicle_type,
        "lane": lane,
    }


def _exit_body(
    event_id: uuid.UUID | str | None,
    occurred_at: datetime | None,
    plate: str,
    plate_color: str,
    lane: str,
) -> dict[str, Any]:
    return _event_body(event_id, occurred_at) | {
        "plate": plate,
        "plate_color": plate_color,
        "lane": lane,
    }


def _offline_answer(stored: Mapping[str, Any], event_id: str) -> Decision:
    reason = stored.get("reason")
    return Decision(
        event_id=str(stored.get("event_id") or event_id),
        decision=str(stored["decision"]),
        reason=None if reason is None else str(reason),
        session_id=None,
        offline=True,
    )


def _replay_item(event: OutboxEvent, offline_field: bool = True) -> dict[str, Any]:
    """A batch item; an exit the gate decided offline carries that decision, for the city to
    honour what the gate promised. Rows written by older versions have no snapshot version
    and no decision time: the decision was taken within the exit deadline of the write."""
    item = {"kind": event.kind, **event.body}
    stored = event.offline_decision
    if offline_field and event.kind == "exit" and stored and stored.get("decision"):
        decided_at = stored.get("decided_at") or (
            datetime.fromtimestamp(event.created_at, UTC).isoformat()
        )
        item["offline_decision"] = {
            "decision": stored["decision"],
            "reason": stored.get("reason"),
            "eligibility_version": stored.get("eligibility_version"),
            "decided_at": decided_at,
        }
    return item


def _offline_field_refused(item: Mapping[str, Any]) -> bool:
    detail = item.get("detail")
    return item.get("code") == "offline_decision_invalid" or (
        item.get("code") == "validation_failed"
        and isinstance(detail, str)
        and detail.startswith("offline_decision")
    )


def _warn_if_broken(event_id: str, offline: str | None, answer: Mapping[str, Any]) -> None:
    if offline == "postpay" and answer.get("decision") not in ("postpay", "free", None):
        log.warning(
            "citypark: exit %s left on an offline postpay but the city recorded %s (%s)",
            event_id,
            answer.get("decision"),
            answer.get("reason"),
        )


def _heartbeat(free_spaces: int, total_spaces: int) -> dict[str, Any]:
    return {"free_spaces": free_spaces, "total_spaces": total_spaces, "sdk_version": __version__}


def _decision(data: Mapping[str, Any], event_id: str) -> Decision:
    reason, session_id = data.get("reason"), data.get("session_id")
    return Decision(
        event_id=str(data.get("event_id") or event_id),
        decision=str(data["decision"]),
        reason=None if reason is None else str(reason),
        session_id=None if session_id is None else str(session_id),
    )


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ConnectorError(
            response.status_code,
            "invalid_response",
            "CityPark answered with a body that is not a JSON object",
            response.headers.get(_REQUEST_ID_HEADER),
        )
    return data


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date; the backoff schedule is good enough then


def _error_from(response: httpx.Response) -> ConnectorError:
    """Read the RFC 9457 problem document; fall back to the status line for anything else."""
    try:
        data = response.json()
    except ValueError:
        data = None
    problem: dict[str, Any] = data if isinstance(data, dict) else {}
    code = problem.get("code")
    detail = problem.get("detail") or problem.get("title") or response.reason_phrase
    request_id = response.headers.get(_REQUEST_ID_HEADER) or problem.get("request_id")
    return ConnectorError(
        response.status_code,
        code if isinstance(code, str) else f"http_{response.status_code}",
        str(detail),
        None if request_id is None else str(request_id),
        _retry_after(response),
    )


def _problem_of(response: httpx.Response, error: ConnectorError) -> dict[str, Any]:
    return {
        "status": response.status_code,
        "code": error.code,
        "detail": error.detail,
        "request_id": error.request_id,
    }


def _as_rejected(error: ConnectorError) -> EventRejected:
    return EventRejected(error.http_status, error.code, error.detail, error.request_id)


def _rejected(problem: Mapping[str, Any], request_id: str | None) -> EventRejected:
    return EventRejected(
        int(problem.get("status") or 422),
        str(problem.get("code") or "rejected"),
        str(problem.get("detail") or "the city rejected this event"),
        request_id or problem.get("request_id"),
    )
