"""`/v1/admin/dead-letters`: what every consumer set aside and billing's parked work, for ops
to read (any admin role; plates and phones in payloads masked) and replay (admins; audited)."""

from __future__ import annotations

from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Path, Query, Request

from services.gateway.deadletters.schemas import (
    DeadLettersOut,
    ParkedItem,
    ParkedKind,
    ReplayAllIn,
    ReplayAllOut,
)
from shared import audit
from shared.auth import Admin, AdminAuth
from shared.bus import deadletters
from shared.bus.deadletters import DeadLetterNotReplayable, DeadLetterOut, DeadLetterUnknown
from shared.db import transaction
from shared.errors import NotFound, UpstreamUnavailable
from shared.http import problem_responses
from shared.masking import UNMASK_RESPONSES, View, staff_view
from shared.runtime import Runtime

router = APIRouter(prefix="/v1/admin", tags=["admin: reliability"])
log = structlog.get_logger(__name__)


def _rt(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def _audit(
    rt: Runtime, admin: Admin, action: str, entity: str, entity_id: str, **after: Any
) -> None:
    """Recorded once the replay went out: a replay is a publish, which no transaction of ours
    can hold back, so the record follows it (a failed replay is not recorded)."""
    with transaction(rt.sessionmaker) as db:
        audit.record(
            db,
            admin,
            service="gateway",
            action=action,
            entity=entity,
            entity_id=entity_id,
            after=after,
        )


@router.get(
    "/dead-letters",
    response_model=DeadLettersOut,
    responses={**problem_responses(UpstreamUnavailable), **UNMASK_RESPONSES},
)
def list_dead_letters(
    view: Annotated[View, Depends(staff_view("gateway", "dead_letter"))],
    request: Request,
    consumer: Annotated[str | None, Query(max_length=200)] = None,
    include_replayed: bool = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DeadLettersOut:
    """Dead letters (open ones unless `include_replayed`), and billing's parked charges,
    refunds and notifications with the money work still due per queue. Plates and phones in
    payloads and errors are masked unless an admin asks `unmasked=true` with a `reason`."""
    rt = _rt(request)
    with rt.read_sessionmaker() as db:
        rows = deadletters.listing(
            db, consumer=consumer, include_replayed=include_replayed, limit=limit
        )
        letters = [deadletters.out(r) for r in rows]
    for letter in letters:
        letter.payload, letter.error = view.json_text(letter.payload), view.text(letter.error)
    stuck: dict[str, Any] = rt.internal("billing").call("GET", "/internal/billing/parked")
    parked = [ParkedItem.model_validate(i) for i in stuck["items"]]
    for item in parked:
        item.detail = view.text(item.detail)
    return DeadLettersOut(
        dead_letters=letters,
        parked=parked,
        due_backlog=stuck["due_backlog"],
    )


@router.post(
    "/dead-letters/{dead_letter_id}/replay",
    response_model=DeadLetterOut,
    responses=problem_responses(DeadLetterUnknown, DeadLetterNotReplayable, UpstreamUnavailable),
)
def replay_dead_letter(
    dead_letter_id: Annotated[int, Path(ge=1, le=2**63 - 1)],  # a 64-bit row id
    admin: AdminAuth,
    request: Request,
) -> DeadLetterOut:
    """Publish the event again to its topic; only the consumer that set it aside applies it
    (the others skip it by its id)."""
    rt = _rt(request)
    row = deadletters.replay(rt.sessionmaker, rt.bus, dead_letter_id)
    log.info("ops.deadletter_replayed", dead_letter_id=dead_letter_id, by=admin.id)
    _audit(
        rt,
        admin,
        "dead_letter.replay",
        "dead_letter",
        str(dead_letter_id),
        consumer=row.consumer,
        topic=row.topic,
        event_id=row.event_id,
    )
    return deadletters.out(row)


@router.post(
    "/dead-letters/replay",
    response_model=ReplayAllOut,
    responses=problem_responses(UpstreamUnavailable),
)
def replay_all(data: ReplayAllIn, admin: AdminAuth, request: Request) -> ReplayAllOut:
    """Replay every open dead letter (of one consumer, if named) and, unless told not to,
    every parked charge, refund and notification."""
    rt = _rt(request)
    replayed, skipped = deadletters.replay_all(rt.sessionmaker, rt.bus, consumer=data.consumer)
    parked = 0
    if data.parked:
        billing = rt.internal("billing")
        stuck: dict[str, Any] = billing.call("GET", "/internal/billing/parked")
        for item in stuck["items"]:
            billing.call("POST", f"/internal/billing/parked/{item['kind']}/{item['id']}/replay")
            parked += 1
    log.info("ops.replay_all", replayed=replayed, skipped=skipped, parked=parked, by=admin.id)
    _audit(
        rt,
        admin,
        "dead_letter.replay_all",
        "dead_letter",
        data.consumer or "*",
        replayed=replayed,
        skipped_undecodable=skipped,
        parked_replayed=parked,
    )
    return ReplayAllOut(replayed=replayed, skipped_undecodable=skipped, parked_replayed=parked)


@router.post(
    "/parked/{kind}/{item_id}/replay",
    status_code=204,
    responses=problem_responses(NotFound, UpstreamUnavailable),
)
def replay_parked(
    kind: ParkedKind,
    # An id as billing issues them; it goes into billing's URL, so nothing else gets through.
    item_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")],
    admin: AdminAuth,
    request: Request,
) -> None:
    """Put one parked charge, refund or notification back in its queue (a charge or refund
    is asked about at the provider before anything is sent again)."""
    rt = _rt(request)
    rt.internal("billing").call("POST", f"/internal/billing/parked/{kind}/{item_id}/replay")
    log.info("ops.parked_replayed", kind=kind, item_id=item_id, by=admin.id)
    _audit(rt, admin, "parked.replay", str(kind), item_id)
