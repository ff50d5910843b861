"""HTTP of drivers' rights: export, deletion, log out everywhere, change of phone number; and
the drivers' token cut-offs every service that verifies driver tokens reads."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse

from services.billing.driver.service import PhoneInvalid, mask_phone
from services.billing.rights import service as rights
from services.billing.rights.schemas import DriverExport, PhoneChange, PhoneConfirm, PhoneOut
from services.billing.signin import limits
from services.billing.signin.endpoints import Caller, SmsUnavailable, sms_port
from services.billing.signin.service import OtpInvalid, OtpLocked
from shared.auth import DriverAuth, InternalAuth
from shared.deps import DbSession
from shared.errors import PROBLEM_CONTENT_TYPE, NotFound, Problem, UpstreamUnavailable
from shared.http import problem_responses
from shared.runtime import Runtime

me = APIRouter(prefix="/v1/me", tags=["driver: privacy"])
internal = APIRouter(prefix="/internal/billing/drivers", include_in_schema=False)


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


@me.get("/export", response_model=DriverExport, responses=problem_responses(UpstreamUnavailable))
def export(who: DriverAuth, db: DbSession, request: Request) -> dict[str, Any]:
    """Everything the city holds about me, as JSON: profile, payment account (masked),
    vehicles and their verification history, parkings, charges, refunds, disputes, invoices,
    notifications and preferences, webhook (no secret is stored), passes."""
    return rights.export(db, _runtime(request), who.id)


@me.delete(
    "",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(
        rights.AccountHasArrears, rights.AccountHasOpenSessions, UpstreamUnavailable
    ),
)
def delete_me(who: DriverAuth, request: Request) -> Response:
    """Delete my account: personal data is erased, money records stay anonymised (see
    docs/privacy.md). Refused (409) while money is owed or a parking is open. Afterwards every
    token of mine is refused, and signing in with my number makes a new account."""
    rights.delete_driver(_runtime(request), who.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@me.post("/logout-all", status_code=status.HTTP_204_NO_CONTENT)
def logout_all(who: DriverAuth, db: DbSession, request: Request) -> Response:
    """Revoke every token of mine, this one included, in every service (within seconds)."""
    rights.logout_all(db, _runtime(request), who.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@me.post(
    "/phone",
    status_code=status.HTTP_202_ACCEPTED,
    responses=problem_responses(
        PhoneInvalid,
        rights.PhoneTaken,
        rights.PhoneUnchanged,
        limits.SigninRateLimited,
        limits.OtpRateLimited,
        SmsUnavailable,
    ),
)
def request_phone_change(
    address: Caller, data: PhoneChange, who: DriverAuth, db: DbSession, request: Request
) -> dict[str, str]:
    """Change my number: a code goes to the new number and one to the current one; confirm
    with both (`POST /v1/me/phone/confirm`). Limited as sign-in codes are."""
    rt = _runtime(request)
    rights.request_phone_change(
        db, rt.settings, rt.redis, sms_port(request), who.id, data.phone, address
    )
    return {"status": "sent"}


@me.post(
    "/phone/confirm",
    response_model=PhoneOut,
    responses=problem_responses(
        PhoneInvalid, OtpInvalid, OtpLocked, rights.PhoneTaken, limits.SigninRateLimited
    ),
)
def confirm_phone_change(
    address: Caller, data: PhoneConfirm, who: DriverAuth, db: DbSession, request: Request
) -> PhoneOut | JSONResponse:
    """Switch to the new number with the codes sent to both numbers (from the same address)."""
    result = rights.confirm_phone_change(
        db, _runtime(request).settings, who.id, data.phone, data.code_old, data.code_new, address
    )
    if isinstance(result, Problem):
        return JSONResponse(
            result.to_dict(instance=request.url.path),
            status_code=result.status,
            media_type=PROBLEM_CONTENT_TYPE,
        )
    return PhoneOut(phone=mask_phone(data.phone))


@internal.get("/token-cutoffs", responses=problem_responses(NotFound))
def token_cutoffs(_: InternalAuth, request: Request) -> dict[str, list[dict[str, Any]]]:
    """Drivers whose tokens issued up to `cutoff_ms` (Unix ms) are refused, for every driver
    whose cut-off is younger than a token's lifetime (shared/auth.py `DriverCutoffs`)."""
    rt = _runtime(request)
    found = rights.recent_cutoffs(rt.read_sessionmaker, rt.settings)
    return {"cutoffs": [{"driver_id": d, "cutoff_ms": c} for d, c in found.items()]}
