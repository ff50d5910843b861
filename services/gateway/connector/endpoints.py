"""The connector API (SPEC §4): what car parks call, every request signed (RFC 9421)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from services.gateway.connector import eligibility as snapshots
from services.gateway.connector import passes, ratelimit, service
from services.gateway.connector.auth import Caller, LotAuth
from services.gateway.connector.schemas import (
    BatchIn,
    BatchOut,
    EligibilityOut,
    EntryIn,
    EntryOut,
    ExitIn,
    ExitOut,
    HeartbeatIn,
    HeartbeatOut,
    KdfOut,
    OfflineDecisionInvalid,
    PassIn,
    PassOut,
)
from services.gateway.offline import service as offline
from shared.doors import BodyTooLarge
from shared.errors import (
    DigestMismatch,
    KeyUnknown,
    NonceReused,
    PlateColorInvalid,
    PlateInvalid,
    RateLimited,
    SignatureExpired,
    SignatureInvalid,
    SignatureMissing,
    UpstreamUnavailable,
    ValidationFailed,
)
from shared.http import problem_responses
from shared.runtime import Runtime

router = APIRouter(prefix="/v1/connector", tags=["connector (car parks)"])

SIGNED = problem_responses(
    SignatureMissing,
    SignatureInvalid,
    KeyUnknown,
    SignatureExpired,
    NonceReused,
    DigestMismatch,
    RateLimited,
    BodyTooLarge,
)
EVENT_ERRORS = problem_responses(PlateInvalid, PlateColorInvalid, service.OccurredAtOutOfRange)
EXIT_ERRORS = problem_responses(
    PlateInvalid, PlateColorInvalid, service.OccurredAtOutOfRange, OfflineDecisionInvalid
)


def _rt(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


async def _over_budget(request: Request, caller: Caller) -> JSONResponse | None:
    """The 429 answer when the lot is over its request budget (checked after the signature,
    so nobody can spend a lot's budget with requests it did not sign)."""
    assert caller.lot_id
    lot_id = caller.lot_id

    def count() -> float | None:
        offline.mark_seen(_rt(request), lot_id)  # the car park is in touch: no outage now
        return ratelimit.check(_rt(request), lot_id)

    wait = await run_in_threadpool(count)
    return None if wait is None else ratelimit.too_many(wait)


@router.post(
    "/entries",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=EntryOut,
    responses={**SIGNED, **EVENT_ERRORS},
)
async def report_entry(data: EntryIn, caller: LotAuth, request: Request) -> EntryOut | Response:
    """A vehicle entered. Durable once answered; a repeated `event_id` answers `duplicate`."""
    if (limited := await _over_budget(request, caller)) is not None:
        return limited
    rt = _rt(request)

    def run() -> EntryOut:
        out, event = service.prepare_entry(rt, caller, data)
        if event is not None:
            service.publish(rt, [(out, event)])
        return out

    return await run_in_threadpool(run)


@router.post("/exits", response_model=ExitOut, responses={**SIGNED, **EXIT_ERRORS})
async def report_exit(data: ExitIn, caller: LotAuth, request: Request) -> ExitOut | Response:
    """A vehicle is at the exit gate: may it leave and pay afterwards (`postpay`)?

    The exit is durably recorded before the answer.

    The replay of an exit the gate decided offline carries `offline_decision`. A `postpay`
    given then is honoured when the city can back it: `decided_at` lies in an outage of the
    car park, the city served it the snapshot `eligibility_version` and the vehicle was
    eligible in it. Then, if the vehicle still belongs to a driver, the exit is recorded
    `postpay` with reason `offline_snapshot` (charged as usual, a decline opens arrears) even
    when the city would now say `pay_on_site`; if it belongs to nobody any more, the current
    decision stands and the event keeps the offline one. An unbacked `postpay` is decided as
    the city decides now and kept as a claim for the operator. An offline `pay_on_site` or
    `free` is never charged afterwards, and a pass still makes the exit `free`. The answer
    says what was recorded. The same applies to exits in `/batches`."""
    if (limited := await _over_budget(request, caller)) is not None:
        return limited
    rt = _rt(request)

    def run() -> ExitOut:
        out, event = service.prepare_exit(rt, caller, data)
        if event is not None:
            service.publish(rt, [(out, event)])
        return out

    return await run_in_threadpool(run)


@router.post("/batches", response_model=BatchOut, responses=SIGNED)
async def report_batch(data: BatchIn, caller: LotAuth, request: Request) -> BatchOut | Response:
    """Up to 500 entries/exits at once (replay after an outage); one result per item, in order.

    An exit the gate decided offline carries `offline_decision`, handled as in `/exits`.
    A batch counts as one request against the lot's budget."""
    if (limited := await _over_budget(request, caller)) is not None:
        return limited
    results = await run_in_threadpool(service.batch, _rt(request), caller, data.events)
    return BatchOut(
        accepted=sum(r.status == "accepted" for r in results),
        duplicates=sum(r.status == "duplicate" for r in results),
        rejected=sum(r.status == "rejected" for r in results),
        results=results,
    )


@router.post("/heartbeats", response_model=HeartbeatOut, responses=SIGNED)
async def heartbeat(
    data: HeartbeatIn, caller: LotAuth, request: Request
) -> HeartbeatOut | Response:
    """Free spaces now (feeds the drivers' map) and the SDK version."""
    if (limited := await _over_budget(request, caller)) is not None:
        return limited
    rt = _rt(request)
    try:
        await run_in_threadpool(
            rt.internal("lots").call,
            "POST",
            f"/internal/lots/{caller.lot_id}/heartbeat",
            data.model_dump(),
        )
    except ValueError:
        pass  # recorded; the lots service answers 204 No Content, which has no JSON to read
    return HeartbeatOut()


@router.get(
    "/eligibility",
    response_model=EligibilityOut,
    responses={**SIGNED, 304: {"description": "Unchanged since the version in If-None-Match"}},
)
async def eligibility(caller: LotAuth, request: Request) -> EligibilityOut | Response:
    """Vehicles allowed to leave on post-pay now, hashed for this car park, for gate decisions
    while offline.

    `vehicles` holds scrypt("<plate>:<plate_color>", salt, n, r, p, dklen) of normalised plates
    as hex, with the parameters and the salt in `kdf` (its district's, or its own): the gate
    hashes the plate in front of it once and looks it up (`format` 2; the unsalted sha256 list
    of format 1 is no longer served). A salt changes with a new `version`. While the city is
    still hashing newly eligible vehicles for this car park, `complete` is false and they are
    left out (offline they pay on site). Passes are the car park's own: their `vehicle` stays
    sha256("<plate>:<color>").

    The answer carries an `ETag`; send it back in `If-None-Match` to get 304 while nothing
    changed. The city keeps every version it served to the car park for at least 7 days after
    it was replaced: an offline `postpay` is honoured only for a vehicle eligible in the version
    the gate had."""
    if (limited := await _over_budget(request, caller)) is not None:
        return limited
    rt = _rt(request)
    assert caller.lot_id
    passes_version, entries = await run_in_threadpool(passes.view, rt, caller.lot_id)
    version = await run_in_threadpool(snapshots.current_version, rt.redis)
    # The lot's post-pay flag and passes are part of the answer, so they are part of the tag; a
    # snapshot still being hashed has its size in the tag, so that it is never taken for done.
    tail = f"{int(caller.postpay_enabled)}-{passes_version}"
    etag = f'"{version}-{tail}"'
    if etag in (t.strip() for t in request.headers.get("if-none-match", "").split(",")):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    if caller.postpay_enabled:
        scope = snapshots.salt_scope(rt.settings, caller.lot_id, caller.district)
        built = await run_in_threadpool(snapshots.build, rt, scope)
        version, kdf, served, complete = built.version, built.kdf, built.hashes, built.complete
        etag = f'"{version}-{tail}"' if complete else f'"{version}.{len(served)}-{tail}"'
    else:
        # A lot without post-pay decides `pay_on_site` anyway; it gets no drivers' hashes
        # and no salt.
        kdf, served, complete = None, [], True
    # Kept as served: an offline `postpay` is honoured only if this snapshot backs it. A partial
    # one is not: a gate holding a complete snapshot keeps it (the SDK does), and it must not
    # count as replaced by a list still being hashed.
    if complete:
        await run_in_threadpool(
            offline.record_served,
            rt,
            caller.lot_id,
            version,
            served,
            None if kdf is None else kdf.spec(),
        )
    out = EligibilityOut(
        version=version,
        lot_postpay_enabled=caller.postpay_enabled,
        kdf=None
        if kdf is None
        else KdfOut(salt=kdf.salt, n=kdf.n, r=kdf.r, p=kdf.p, dklen=kdf.dklen),
        complete=complete,
        vehicles=served,
        passes=entries,
        passes_version=passes_version,
    )
    return JSONResponse(out.model_dump(mode="json"), headers={"ETag": etag})


PASS_ERRORS = problem_responses(
    PlateInvalid,
    PlateColorInvalid,
    ValidationFailed,
    passes.PassValidityInvalid,
    passes.PassWindowInvalid,
    passes.PassIdInvalid,
    UpstreamUnavailable,
)


@router.put("/passes/{pass_id}", response_model=PassOut, responses={**SIGNED, **PASS_ERRORS})
async def put_pass(
    pass_id: str, data: PassIn, caller: LotAuth, request: Request
) -> PassOut | Response:
    """Create or replace a pass or whitelist entry of this car park (SPEC §10).

    Idempotent: the same body again answers `unchanged`. Units of a stay starting inside the
    pass (its validity, and its daily `window` if any) cost 0; a stay it covers wholly leaves
    with the gate decision `free`."""
    if (limited := await _over_budget(request, caller)) is not None:
        return limited
    return await run_in_threadpool(passes.put, _rt(request), caller, pass_id, data)


@router.delete(
    "/passes/{pass_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**SIGNED, **problem_responses(passes.PassUnknown, passes.PassIdInvalid)},
)
async def delete_pass(pass_id: str, caller: LotAuth, request: Request) -> Response:
    """Withdraw a pass; later stays are priced and decided without it. Repeats answer 204."""
    if (limited := await _over_budget(request, caller)) is not None:
        return limited
    await run_in_threadpool(passes.delete, _rt(request), caller, pass_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
