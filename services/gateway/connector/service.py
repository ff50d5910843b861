"""Accepting connector events: validate, decide at the exit gate, publish durably, dedupe.

A 2xx means the event is durable on the district's topic (Kafka acks=all, or the embedded
log committed). Repeats of an `event_id` answer the first result; should the remembered
answer be gone, the downstream consumers still deduplicate on the event id.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from typing import Any

import structlog
from pydantic import ValidationError

from services.gateway.connector import passes
from services.gateway.connector.auth import Caller
from services.gateway.connector.schemas import (
    BatchItemOut,
    EntryIn,
    EntryOut,
    ExitIn,
    ExitOut,
    OfflineDecisionIn,
    OfflineDecisionInvalid,
)
from services.gateway.gate import state
from services.gateway.offline import service as bounds
from shared.errors import Problem, problem
from shared.events import Decision, EventType, Kind, LotEvent, new_event, session_id_for
from shared.plates import normalize_plate, parse_plate_color
from shared.runtime import Runtime
from shared.timeutil import utcnow
from shared.topics import lot_events

log = structlog.get_logger(__name__)
SOURCE = "gateway"
ANSWER_TTL_S = 8 * 24 * 3600  # replays come up to 7 days late

OccurredAtOutOfRange = problem(
    422, "occurred_at_out_of_range", "occurred_at is more than 7 days past or 5 minutes ahead"
)
OccurredAtNaive = problem(422, "occurred_at_invalid", "occurred_at needs a UTC offset")


def _check_time(rt: Runtime, at: datetime) -> None:
    if at.tzinfo is None:
        raise OccurredAtNaive("Send RFC 3339 with an offset, e.g. 2026-11-25T08:10:00+08:00")
    now = utcnow()
    if at < now - timedelta(seconds=rt.settings.occurred_at_max_past_s) or at > now + timedelta(
        seconds=rt.settings.occurred_at_max_future_s
    ):
        raise OccurredAtOutOfRange(f"occurred_at {at.isoformat()} is outside the accepted window")


def _answer_key(lot_id: str, event_id: str) -> str:
    return f"citypark:gw:answer:{lot_id}:{event_id}"


def _lot_event(
    caller: Caller, kind: Kind, data: EntryIn | ExitIn, plate: str, color: str, **extra: Any
) -> LotEvent:
    assert caller.lot_id
    assert caller.lot_code
    assert caller.operator_id
    return LotEvent(
        event_id=str(data.event_id),
        kind=kind,
        lot_id=caller.lot_id,
        lot_code=caller.lot_code,
        district=caller.district,
        operator_id=caller.operator_id,
        plate=plate,
        plate_color=color,
        occurred_at=data.occurred_at,
        received_at=utcnow(),
        lane=data.lane or None,
        **extra,
    )


def _cloud(e: LotEvent) -> tuple[str, str, Any]:
    type_ = EventType.connector_entry if e.kind is Kind.entry else EventType.connector_exit
    return (
        lot_events(e.district),
        e.lot_id,
        new_event(type_, source=SOURCE, data=e, subject=e.lot_id, id_=f"{e.lot_id}/{e.event_id}"),
    )


def _read(rt: Runtime, *keys: str) -> list[str | None]:
    """Several independent keys in one round trip (the gate's answer time is mostly these)."""
    pipe = rt.redis.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
    return [None if v is None else str(v) for v in pipe.execute()]


def prepare_entry(rt: Runtime, caller: Caller, data: EntryIn) -> tuple[EntryOut, LotEvent | None]:
    assert caller.lot_id
    plate = normalize_plate(data.plate)
    color = parse_plate_color(data.plate_color).value
    seen, driver_id = _read(
        rt,
        _answer_key(caller.lot_id, str(data.event_id)),
        state.vehicle_key_of(rt.settings, plate, color),
    )
    if seen is not None:
        return EntryOut(event_id=json.loads(seen)["event_id"], status="duplicate"), None
    _check_time(rt, data.occurred_at)
    event = _lot_event(
        caller, Kind.entry, data, plate, color, vehicle_type=data.vehicle_type, driver_id=driver_id
    ).sealed(rt.settings)
    return EntryOut(event_id=str(data.event_id), status="accepted"), event


def _keep_offline_answer(
    rt: Runtime,
    caller: Caller,
    data: ExitIn,
    plate: str,
    color: str,
    offline: OfflineDecisionIn,
    fresh: state.GateAnswer,
) -> state.GateAnswer:
    """What the gate answered offline is what happened at the barrier; the record follows it
    as far as the city can stand behind it (docs/gate.md, "Offline decisions").

    An offline `postpay` the city can back (the car park was in an outage at `decided_at` and
    held a snapshot the city served it, in which the vehicle was eligible) is honoured: the
    driver whose vehicle it is is charged as promised (a decline then opens arrears like any
    other), even if they were suspended or unbound meanwhile; with nobody behind the plate any
    more there is no one to charge, and the event keeps the promise. One it cannot back is
    decided as the city decides now and kept as a claim for the operator to take up.

    An offline `pay_on_site` (or `free`) means the driver paid at the gate (or left free):
    charging them again afterwards would take the money twice, so it stays what the gate said
    and the city charges nothing; where the city would have said `postpay`, it is kept as a
    claim too (the operator carries what the gate did not collect)."""
    if offline.decision is fresh.decision:
        return fresh
    assert caller.lot_id
    where = {"lot": caller.lot_code, "event_id": str(data.event_id)}
    claim = {
        "lot_id": caller.lot_id,
        "event_id": str(data.event_id),
        "lot_code": caller.lot_code or "",
        "plate": plate,
        "plate_color": color,
        "claimed_decision": offline.decision.value,
        "eligibility_version": offline.eligibility_version,
        "decided_at": offline.decided_at,
    }
    if offline.decision is Decision.postpay:
        unbacked = bounds.unbacked_reason(
            rt,
            caller.lot_id,
            plate,
            color,
            offline.eligibility_version,
            offline.decided_at,
            utcnow(),
        )
        if unbacked is not None:
            bounds.record_claim(
                rt,
                **claim,
                reason=unbacked,
                decision=fresh.decision.value,
                driver_id=fresh.driver_id,
            )
            return fresh
        if fresh.driver_id is None:
            log.warning(
                "connector.offline_promise_unchargeable",
                **where,
                fresh_reason=fresh.reason,
                eligibility_version=offline.eligibility_version,
            )
            return fresh
        log.info(
            "connector.offline_promise_honoured",
            **where,
            driver_id=fresh.driver_id,
            fresh_reason=fresh.reason,
            eligibility_version=offline.eligibility_version,
        )
        return state.GateAnswer(Decision.postpay, "offline_snapshot", fresh.driver_id)
    if fresh.decision is Decision.postpay:
        bounds.record_claim(
            rt,
            **claim,
            reason=bounds.CITY_WOULD_POSTPAY,
            decision=offline.decision.value,
            driver_id=fresh.driver_id,
        )
        return state.GateAnswer(offline.decision, "offline_snapshot", fresh.driver_id)
    return fresh  # neither charges after the exit


# What a car park may hear about a refused post-pay: its own doing (a lot without post-pay, the
# gate's own offline answer kept), or `not_eligible`. Why a driver is not eligible (arrears, no
# account, an unproven vehicle) is the driver's business and stays in the city's events.
LOT_REASONS = frozenset({"lot_not_postpay", "offline_snapshot"})
NOT_ELIGIBLE = "not_eligible"


def public_reason(answer: state.GateAnswer) -> str:
    """The reason as the car park gets it (docs/privacy.md, "Eligibility snapshots")."""
    if answer.decision is Decision.pay_on_site and answer.reason not in LOT_REASONS:
        return NOT_ELIGIBLE
    return answer.reason


def prepare_exit(rt: Runtime, caller: Caller, data: ExitIn) -> tuple[ExitOut, LotEvent | None]:
    assert caller.lot_id
    plate = normalize_plate(data.plate)
    color = parse_plate_color(data.plate_color).value
    seen, driver_id, open_id = _read(
        rt,
        _answer_key(caller.lot_id, str(data.event_id)),
        state.vehicle_key_of(rt.settings, plate, color),
        state.open_key(rt.settings, caller.lot_id, plate, color),
    )
    if seen is not None:
        return ExitOut.model_validate({**json.loads(seen), "status": "duplicate"}), None
    _check_time(rt, data.occurred_at)
    offline = data.offline_decision
    if offline is not None:
        now = utcnow()
        earliest = now - timedelta(seconds=rt.settings.occurred_at_max_past_s)
        latest = now + timedelta(seconds=rt.settings.occurred_at_max_future_s)
        if not earliest <= offline.decided_at <= latest:
            raise OfflineDecisionInvalid(
                f"decided_at {offline.decided_at.isoformat()} is outside the accepted window"
            )
    answer = state.decide_for(
        rt.redis,
        driver_id,
        postpay_enabled=caller.postpay_enabled,
        vehicle=state.ref(rt.settings, plate, color),
    )
    # A pass covering the whole stay lets the car out free, post-pay or not (SPEC §10).
    reason = passes.free_reason(rt, caller.lot_id, plate, color, data.occurred_at)
    if reason is not None:
        answer = state.GateAnswer(Decision.free, reason, answer.driver_id)
    elif offline is not None:
        answer = _keep_offline_answer(rt, caller, data, plate, color, offline, answer)
    event = _lot_event(
        caller,
        Kind.exit,
        data,
        plate,
        color,
        decision=answer.decision,
        reason=answer.reason,
        driver_id=answer.driver_id,
        offline_decision=None if offline is None else offline.model_dump(mode="json"),
    ).sealed(rt.settings)
    out = ExitOut(
        event_id=str(data.event_id),
        decision=answer.decision,
        reason=public_reason(answer),
        session_id=open_id or None,
    )
    return out, event


CLAIM_TTL_S = 30  # longer than any publish may take (the producer gives up after 15 s)
CLAIM_WAIT_S = 20.0


def _claim_key(e: LotEvent) -> str:
    return f"citypark:gw:claim:{e.lot_id}:{e.event_id}"


def _claim(rt: Runtime, accepted: list[tuple[EntryOut | ExitOut, LotEvent]]) -> list[bool]:
    """Claim each event id before publishing: a resend that races its original (the SDK
    retrying a request still in flight) then waits for the original instead of publishing a
    second copy."""
    pipe = rt.redis.pipeline(transaction=False)
    for _, e in accepted:
        pipe.set(_claim_key(e), 1, nx=True, ex=CLAIM_TTL_S)
    return [bool(won) for won in pipe.execute()]


def _await_other(rt: Runtime, e: LotEvent) -> bool:
    """True once the request holding the claim has published (its answer is remembered);
    False if it gave up (its claim is gone without an answer): then publish ourselves."""
    deadline = time.monotonic() + CLAIM_WAIT_S
    while time.monotonic() < deadline:
        if rt.redis.exists(_answer_key(e.lot_id, e.event_id)):
            return True
        if not rt.redis.exists(_claim_key(e)):
            return False
        time.sleep(0.02)
    return False


def publish(rt: Runtime, accepted: list[tuple[EntryOut | ExitOut, LotEvent]]) -> None:
    """Publish durably, then remember the answers and the open sessions."""
    if not accepted:
        return
    won = _claim(rt, accepted)
    mine = [pair for pair, ok in zip(accepted, won, strict=True) if ok]
    for pair, ok in zip(accepted, won, strict=True):
        if not ok and not _await_other(rt, pair[1]):
            mine.append(pair)
    if not mine:
        return
    accepted = mine
    try:
        rt.bus.publish_many([_cloud(e) for _, e in accepted])
    except Exception:
        rt.redis.delete(*[_claim_key(e) for _, e in accepted])  # let a retry publish them
        raise
    pipe = rt.redis.pipeline(transaction=False)
    for answer, e in accepted:
        pipe.set(_answer_key(e.lot_id, e.event_id), answer.model_dump_json(), ex=ANSWER_TTL_S)
        open_key = state.open_key(rt.settings, e.lot_id, e.plate, e.plate_color)
        entered_key = state.entered_key(rt.settings, e.lot_id, e.plate, e.plate_color)
        if e.kind is Kind.entry:
            pipe.set(open_key, session_id_for(e.lot_id, e.event_id), ex=90 * 24 * 3600)
            pipe.set(entered_key, e.occurred_at.isoformat(), ex=90 * 24 * 3600)
        else:
            pipe.delete(open_key, entered_key)
    pipe.execute()
    for answer, e in accepted:
        log.info(
            f"connector.{e.kind.value}",
            lot=e.lot_code,
            event_id=e.event_id,
            decision=getattr(answer, "decision", None),
        )


def batch(rt: Runtime, caller: Caller, items: list[dict[str, object]]) -> list[BatchItemOut]:
    results: list[BatchItemOut] = []
    accepted: list[tuple[EntryOut | ExitOut, LotEvent]] = []
    seen_ids: set[str] = set()
    for index, raw in enumerate(items):
        body = dict(raw)
        kind = body.pop("kind", None)
        event_id = str(body.get("event_id")) if body.get("event_id") else None
        try:
            if kind == "entry":
                out, event = prepare_entry(rt, caller, EntryIn.model_validate(body))
            elif kind == "exit":
                out, event = prepare_exit(rt, caller, ExitIn.model_validate(body))
            else:
                raise _KindInvalid("kind must be 'entry' or 'exit'")
        except ValidationError as exc:
            err = exc.errors()[0]
            results.append(
                BatchItemOut(
                    index=index,
                    event_id=event_id,
                    status="rejected",
                    code="validation_failed",
                    detail=f"{'.'.join(map(str, err['loc']))}: {err['msg']}",
                )
            )
            continue
        except Problem as exc:
            results.append(
                BatchItemOut(
                    index=index,
                    event_id=event_id,
                    status="rejected",
                    code=exc.code,
                    detail=exc.detail,
                )
            )
            continue
        if event is not None and event.event_id in seen_ids:
            out.status = "duplicate"
            event = None
        item = BatchItemOut(
            index=index,
            event_id=out.event_id,
            status=out.status,
            decision=getattr(out, "decision", None),
            reason=getattr(out, "reason", None),
            session_id=getattr(out, "session_id", None),
        )
        results.append(item)
        if event is not None:
            seen_ids.add(event.event_id)
            accepted.append((out, event))
    publish(rt, accepted)
    return results


_KindInvalid = problem(422, "kind_invalid", "Unknown event kind")
