"""Taking a district platform's batch: parse its dialect, answer every record, publish the
accepted ones durably on the district's topic.

What a 200 means, record by record:
* `accepted`: well-formed, its car park exists in this district (as the lots registry said a
  few seconds ago), its time is in range, and it is durable on `citypark.lot-events.<district>`.
  The adapter re-checks the car park against the registry when it takes the record; should the
  car park have been removed or moved meanwhile, the adapter refuses it and counts it under
  `adapter_rejects` in the district figures. The answer cannot be changed after the fact.
* `duplicate`: the district sent this serial before (this batch, an earlier one, or before a
  restart: remembered in Redis for `SERIAL_TTL_S`, and by the adapter's inbox for good).
* `rejected` with a `code` (`shared.dialects.Reason`): nothing of it was published.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import structlog

from services.gateway.districts import figures
from services.gateway.districts.registry import LotRef, registry
from services.gateway.districts.schemas import DistrictBatchOut, RecordResult
from services.gateway.gate import state
from shared import dialects
from shared.dialects import Parsed, Reason, Record
from shared.errors import problem
from shared.events import EventType, Kind, ParkingEvent, new_event
from shared.runtime import Runtime
from shared.settings import BusKind
from shared.timeutil import utcnow
from shared.topics import ensure_topics, lot_events

log = structlog.get_logger(__name__)

SOURCE = "gateway"
SERIAL_TTL_S = 35 * 24 * 3600  # beyond this, the adapter's inbox still drops a repeat
DISTRICT_NS = uuid.UUID("0c3f6f64-1a0e-4d53-8d58-3a4f2b7de911")
PROVIDER = "districts.limits"  # a `Limits` in `Runtime.providers` overrides the default

DistrictUnknown = problem(404, "district_unknown", "No such district")
DistrictKeyMismatch = problem(
    403, "district_key_mismatch", "The signing key does not belong to this district's platform"
)
BodyTooLarge = problem(413, "body_too_large", "The body is larger than a district batch may be")


@dataclass(frozen=True)
class Limits:
    # Unset: `settings.district_max_body_bytes`, enforced while the body is read.
    max_body_bytes: int | None = None
    max_records: int = 1000
    # A district's platform replays its backlog in bursts; this keeps one from starving others.
    records_per_min: int = 120_000


def limits(rt: Runtime) -> Limits:
    found: Limits = rt.providers.get(PROVIDER) or Limits()
    if found.max_body_bytes is None:
        found = replace(found, max_body_bytes=rt.settings.district_max_body_bytes)
    return found


def over_budget(rt: Runtime, district: str, records: int, now: float | None = None) -> float | None:
    """Count `records` against the district's minute; seconds to wait when over, else None."""
    at = time.time() if now is None else now
    window = int(at // 60)
    key = f"citypark:gw:district:{district}:rate:{window}"
    pipe = rt.redis.pipeline(transaction=False)
    pipe.incrby(key, records)
    pipe.expire(key, 120)
    total, _ = pipe.execute()
    if int(total) <= limits(rt).records_per_min:
        return None
    return (window + 1) * 60 - at


def event_id_for(district: str, serial: str) -> str:
    """The id a record travels under: the same serial always gives the same id downstream."""
    return f"district/{district}/{serial}"


def _serial_key(district: str, serial: str) -> str:
    return f"citypark:gw:district:{district}:serial:{serial}"


_ensured: set[str] = set()
_ensure_lock = threading.Lock()


def _ensure_topic(rt: Runtime, district: str) -> None:
    """An eleventh district's topic may not exist yet on its first push: create it once."""
    if rt.settings.bus is not BusKind.kafka or district in _ensured:
        return
    with _ensure_lock:
        if district not in _ensured:
            ensure_topics(rt.settings.kafka_bootstrap, [lot_events(district)], auth=rt.settings)
            _ensured.add(district)


def _reject(record: Record, reason: Reason, detail: str) -> RecordResult:
    return RecordResult(
        index=record.index, serial=record.serial, status="rejected", code=reason, detail=detail
    )


def _event(rt: Runtime, district: str, dialect: str, record: Record, lot: LotRef) -> Any:
    plate, color = record.plate, record.plate_color.value
    extra: dict[str, Any] = {}
    if record.kind is Kind.entry:
        extra["driver_id"] = state.driver_of(rt.redis, rt.settings, plate, color)
    else:
        # The car has left already; the decision is the one the city would have given.
        answer = state.decide(
            rt.redis, rt.settings, plate=plate, color=color, postpay_enabled=lot.postpay_enabled
        )
        extra.update(decision=answer.decision, reason=answer.reason, driver_id=answer.driver_id)
    data = ParkingEvent(
        event_id=str(uuid.uuid5(DISTRICT_NS, f"{district}/{record.serial}")),
        kind=record.kind,
        lot_id=lot.id,
        lot_code=lot.code,
        district=district,
        operator_id=lot.operator_id,
        plate=plate,
        plate_color=color,
        vehicle_type=record.vehicle_type,
        occurred_at=record.occurred_at,
        received_at=utcnow(),
        lane=record.lane,
        dialect=dialect,
        **extra,
    ).sealed(rt.settings)
    type_ = EventType.connector_entry if record.kind is Kind.entry else EventType.connector_exit
    return new_event(
        type_,
        source=f"{SOURCE}/district/{district}",
        data=data,
        subject=lot.id,
        id_=event_id_for(district, record.serial),
    )


def accept(
    rt: Runtime,
    district: str,
    dialect: str,
    parsed: Parsed,
    *,
    backfill: bool = False,
    already_seen: Callable[[list[str]], set[str]] | None = None,
) -> DistrictBatchOut:
    """Answer every record of `parsed` and publish the accepted ones (one durable write).

    `backfill` lifts the 7-day bound on the past (historical records); `already_seen` lets the
    caller add a durable source of serials seen before (event ids in, the seen ones out)."""
    started = time.perf_counter()
    results: dict[int, RecordResult] = {
        r.index: RecordResult(
            index=r.index, serial=r.serial, status="rejected", code=r.reason, detail=r.detail
        )
        for r in parsed.rejected
    }
    lots = registry.lots(rt, {r.lot_code for r in parsed.records}) if parsed.records else {}
    now = utcnow()
    oldest = now - timedelta(seconds=rt.settings.occurred_at_max_past_s)
    newest = now + timedelta(seconds=rt.settings.occurred_at_max_future_s)
    candidates: list[tuple[Record, LotRef]] = []
    for record in parsed.records:
        lot = lots.get(record.lot_code)
        if lot is None:
            results[record.index] = _reject(
                record, Reason.lot_unknown, f"no car park with code {record.lot_code!r}"
            )
        elif lot.district != district:
            results[record.index] = _reject(
                record,
                Reason.lot_other_district,
                f"car park {record.lot_code!r} belongs to district {lot.district!r}",
            )
        elif record.occurred_at > newest or (not backfill and record.occurred_at < oldest):
            results[record.index] = _reject(
                record,
                Reason.occurred_at_out_of_range,
                f"{record.occurred_at.isoformat()} is more than 7 days past or 5 minutes ahead",
            )
        else:
            candidates.append((record, lot))
    remembered = (
        rt.redis.mget([_serial_key(district, r.serial) for r, _ in candidates])
        if candidates
        else []
    )
    seen = (
        already_seen([event_id_for(district, r.serial) for r, _ in candidates])
        if (already_seen and candidates)
        else set()
    )
    fresh: list[tuple[Record, Any]] = []
    in_batch: set[str] = set()
    for (record, lot), known in zip(candidates, remembered, strict=True):
        event_id = event_id_for(district, record.serial)
        if known is not None or event_id in seen or record.serial in in_batch:
            results[record.index] = RecordResult(
                index=record.index, serial=record.serial, status="duplicate", event_id=event_id
            )
            continue
        in_batch.add(record.serial)
        fresh.append((record, _event(rt, district, dialect, record, lot)))
        results[record.index] = RecordResult(
            index=record.index, serial=record.serial, status="accepted", event_id=event_id
        )
    if fresh:
        _ensure_topic(rt, district)
        # Durable before anything is remembered or answered: a failure here is a 5xx and the
        # platform sends the batch again, which is safe (same serials, same event ids).
        rt.bus.publish_many([(lot_events(district), e.subject, e) for _, e in fresh])
        pipe = rt.redis.pipeline(transaction=False)
        for record, e in fresh:
            pipe.set(_serial_key(district, record.serial), e.id, ex=SERIAL_TTL_S)
        pipe.execute()
    ordered = [results[i] for i in sorted(results)]
    statuses = Counter(r.status for r in ordered)
    reasons = Counter(str(r.code) for r in ordered if r.status == "rejected")
    figures.count(rt.redis, district, dialect, statuses, reasons)
    figures.BATCH_SECONDS.labels(district).observe(time.perf_counter() - started)
    log.info(
        "district.batch",
        district=district,
        dialect=dialect,
        accepted=statuses["accepted"],
        duplicates=statuses["duplicate"],
        rejected=statuses["rejected"],
    )
    return DistrictBatchOut(
        district=district,
        dialect=dialect,
        received=len(ordered),
        accepted=statuses["accepted"],
        duplicates=statuses["duplicate"],
        rejected=statuses["rejected"],
        results=ordered,
    )


def take(rt: Runtime, district: str, body: bytes) -> DistrictBatchOut | float:
    """The HTTP path: the district's own dialect, its limits; seconds to wait when over budget."""
    most = limits(rt).max_body_bytes
    assert most is not None
    if len(body) > most:  # the HTTP door counted it already; a backfill comes this way too
        raise BodyTooLarge(f"{len(body)} bytes; at most {most} per batch")
    dialect = registry.dialect(rt, district)
    if dialect is None:
        raise DistrictUnknown(f"No district {district!r}")
    parsed = dialects.parse(dialect, body, max_records=limits(rt).max_records)
    wait = over_budget(rt, district, parsed.total)
    if wait is not None:
        return wait
    return accept(rt, district, dialect, parsed)
