"""HTTP of driver sign-in, and the sandbox SMS outbox admins read in sandbox mode."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, status
from fastapi.responses import JSONResponse

from services.billing.driver.service import PhoneInvalid
from services.billing.signin import limits
from services.billing.signin import service as signin
from services.billing.signin.schemas import OtpRequest, SmsOut, TokenOut, TokenRequest
from services.billing.signin.sms import SandboxOutbox, SmsPort
from shared.auth import AdminAuth, issue_driver_token
from shared.deps import DbSession
from shared.errors import PROBLEM_CONTENT_TYPE, NotFound, Problem, problem
from shared.forwarding import client_address
from shared.http import problem_responses
from shared.runtime import Runtime
from shared.wire import Phone

auth = APIRouter(prefix="/v1/auth", tags=["driver: sign-in"])
admin = APIRouter(prefix="/v1/admin", tags=["admin: billing"])

SmsUnavailable = problem(503, "sms_unavailable", "No SMS gateway is configured")


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def admitted(request: Request) -> str:
    """The caller's address, once this request is counted against the sign-in limits. A
    dependency listed first, so that it runs before the body is validated and before the
    request's transaction is opened."""
    rt = _runtime(request)
    address = client_address(request, rt.secret)
    limits.admit(rt.redis, rt.settings, rt.secret, address)
    return address


Caller = Annotated[str, Depends(admitted)]


def sms_port(request: Request) -> SmsPort:
    plugged: SmsPort | None = getattr(request.app.state, "sms_port", None)
    if plugged is not None:
        return plugged
    if _runtime(request).settings.sandbox_mode:
        return SandboxOutbox()
    raise SmsUnavailable("Sign-in codes cannot be sent: no SMS gateway is plugged in")


@auth.post(
    "/otp",
    status_code=status.HTTP_202_ACCEPTED,
    responses=problem_responses(
        PhoneInvalid, limits.SigninRateLimited, limits.OtpRateLimited, SmsUnavailable
    ),
)
def request_otp(
    address: Caller, data: OtpRequest, db: DbSession, request: Request
) -> dict[str, str]:
    """Send a one-time sign-in code to the phone (through the SMS port). Limited per client
    address, per phone and city-wide (429 with `Retry-After`)."""
    rt = _runtime(request)
    signin.request_otp(db, rt.settings, rt.redis, sms_port(request), data.phone, address)
    return {"status": "sent"}


@auth.post(
    "/token",
    response_model=TokenOut,
    responses=problem_responses(
        PhoneInvalid, signin.OtpInvalid, signin.OtpLocked, limits.SigninRateLimited
    ),
)
def token(
    address: Caller, data: TokenRequest, db: DbSession, request: Request
) -> TokenOut | JSONResponse:
    """Exchange phone + code for a bearer token. Codes are single-use, expire, allow a few
    guesses and work only from the address that asked for them."""
    settings = _runtime(request).settings
    result = signin.verify_otp(db, settings, data.phone, data.code, address)
    if isinstance(result, Problem):
        return JSONResponse(
            result.to_dict(instance=request.url.path),
            status_code=result.status,
            media_type=PROBLEM_CONTENT_TYPE,
        )
    return TokenOut(
        access_token=issue_driver_token(
            settings.jwt_secret.get_secret_value(), result.id, settings.driver_token_ttl_s
        ),
        expires_in=settings.driver_token_ttl_s,
    )


def sandbox_only(request: Request) -> None:
    """Outside sandbox mode the outbox does not exist, for anyone: 404 before any auth."""
    if not _runtime(request).settings.sandbox_mode:
        raise NotFound("The SMS sandbox is off")


@admin.get(
    "/sandbox/sms",
    response_model=list[SmsOut],
    responses=problem_responses(NotFound, PhoneInvalid),
    dependencies=[Depends(sandbox_only)],
)
def sandbox_sms(phone: Phone, _: AdminAuth, db: DbSession) -> list[SmsOut]:
    """Messages the SMS port sent to a phone (sandbox mode only; 404 otherwise)."""
    return [SmsOut.model_validate(m, from_attributes=True) for m in signin.sms_for(db, phone)]
