"""The connector API (SPEC §4): what car parks call, every request signed (RFC 9421)."""

from __future__ import annotations

from fastapi import APIRouter, Request, status
from starlette.concurrency import run_in_threadpool

from services.gateway.connector import service
from services.gateway.connector.auth import LotAuth
from services.gateway.connector.schemas import (
    BatchIn,
    BatchOut,
    EligibilityOut,
    EntryIn,
    EntryOut,
    ExitIn,
    ExitOut,
    HeartbeatIn,
)
from services.gateway.gate import state
from shared.errors import (
    DigestMismatch,
    KeyUnknown,
    NonceReused,
    PlateColorInvalid,
    PlateInvalid,
    SignatureExpired,
    SignatureInvalid,
    SignatureMissing,
)
from shared.http import problem_responses
from shared.runtime import Runtime

router = APIRouter(prefix="/v1/connector", tags=["connector (car parks)"])

SIGNED = problem_responses(
    SignatureMissing, SignatureInvalid, KeyUnknown, SignatureExpired, NonceReused, DigestMismatch
)
EVENT_ERRORS = problem_responses(PlateInvalid, PlateColorInvalid, service.OccurredAtOutOfRange)


def _rt(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


@router.post(
    "/entries",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=EntryOut,
    responses={**SIGNED, **EVENT_ERRORS},
)
async def report_entry(data: EntryIn, caller: LotAuth, request: Request) -> EntryOut:
    """A vehicle entered. Durable once answered; a repeated `event_id` answers `duplicate`."""
    rt = _rt(request)

    def run() -> EntryOut:
        out, event = service.prepare_entry(rt, caller, data)
        if event is not None:
            service.publish(rt, [(out, event)])
        return out

    return await run_in_threadpool(run)


@router.post("/exits", response_model=ExitOut, responses={**SIGNED, **EVENT_ERRORS})
async def report_exit(data: ExitIn, caller: LotAuth, request: Request) -> ExitOut:
    """A vehicle is at the exit gate: may it leave and pay afterwards (`postpay`)?

    The exit is durably recorded before the answer."""
    rt = _rt(request)

    def run() -> ExitOut:
        out, event = service.prepare_exit(rt, caller, data)
        if event is not None:
            service.publish(rt, [(out, event)])
        return out

    return await run_in_threadpool(run)


@router.post("/batches", response_model=BatchOut, responses=SIGNED)
async def report_batch(data: BatchIn, caller: LotAuth, request: Request) -> BatchOut:
    """Up to 500 entries/exits at once (replay after an outage); one result per item."""
    results = await run_in_threadpool(service.batch, _rt(request), caller, data.events)
    return BatchOut(
        accepted=sum(r.status == "accepted" for r in results),
        duplicates=sum(r.status == "duplicate" for r in results),
        rejected=sum(r.status == "rejected" for r in results),
        results=results,
    )


@router.post("/heartbeats", responses=SIGNED)
async def heartbeat(data: HeartbeatIn, caller: LotAuth, request: Request) -> dict[str, str]:
    """Free spaces now (feeds the drivers' map) and the SDK version."""
    rt = _rt(request)
    await run_in_threadpool(
        rt.internal("lots").call,
        "POST",
        f"/internal/lots/{caller.lot_id}/heartbeat",
        data.model_dump(),
    )
    return {"status": "ok"}


@router.get("/eligibility", response_model=EligibilityOut, responses=SIGNED)
async def eligibility(caller: LotAuth, request: Request) -> EligibilityOut:
    """Hashed plates allowed to leave on post-pay now, for gate decisions while offline."""
    version, hashes = await run_in_threadpool(state.eligibility, _rt(request).redis)
    return EligibilityOut(version=version, vehicles=hashes)
