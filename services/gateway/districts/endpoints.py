"""`POST /v1/districts/{district}/events`: a district platform pushes its records in its own
dialect (SPEC §5), signed with its own key like a connector (SPEC §4)."""

from __future__ import annotations

import math

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from services.gateway.connector.auth import SignedCaller
from services.gateway.districts import service
from services.gateway.districts.schemas import DistrictBatchOut
from shared.dialects import BODY_PROBLEMS
from shared.errors import (
    DigestMismatch,
    KeyUnknown,
    NonceReused,
    RateLimited,
    SignatureExpired,
    SignatureInvalid,
    SignatureMissing,
)
from shared.http import problem_response, problem_responses
from shared.runtime import Runtime

router = APIRouter(tags=["district platforms"])


def _rt(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


@router.post(
    "/v1/districts/{district}/events",
    response_model=DistrictBatchOut,
    responses=problem_responses(
        SignatureMissing,
        SignatureInvalid,
        KeyUnknown,
        SignatureExpired,
        NonceReused,
        DigestMismatch,
        service.DistrictKeyMismatch,
        service.DistrictUnknown,
        service.BodyTooLarge,
        RateLimited,
        *BODY_PROBLEMS,
    ),
)
async def push_events(
    district: str, caller: SignedCaller, request: Request
) -> DistrictBatchOut | JSONResponse:
    """A batch of the district platform's records in the district's dialect (`canonical`,
    `legacy-json`, `xml` or `csv`, as registered for the district).

    Every record gets its own result: `accepted` (durable, on its way to sessions), `duplicate`
    (this serial was sent before) or `rejected` with a `code` — one bad record never holds back
    the others. A body that cannot be read at all is a 422 problem; too big (counted while it
    arrives, chunked or not, before the signature is checked), a 413; over the district's
    budget, a 429 with `Retry-After`."""
    if caller.kind != "district" or caller.district != district:
        raise service.DistrictKeyMismatch(
            f"key {caller.key_id!r} may not push for district {district!r}"
        )
    body = await request.body()
    outcome = await run_in_threadpool(service.take, _rt(request), district, body)
    if isinstance(outcome, DistrictBatchOut):
        return outcome
    seconds = max(1, math.ceil(outcome))
    response = problem_response(
        RateLimited.status,
        RateLimited.code,
        RateLimited.title,
        f"District {district} is over its records budget; retry after {seconds} s",
        retry_after_s=seconds,
    )
    response.headers["Retry-After"] = str(seconds)
    return response


@router.get("/metrics/districts", include_in_schema=False)
def metrics() -> Response:
    """Prometheus exposition of this process (district figures among them)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
