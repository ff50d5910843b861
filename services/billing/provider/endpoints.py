"""Where providers post their asynchronous notifications (no bearer: the signature is the auth)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from services.billing.provider import notifications
from services.billing.provider.port import PaymentProvider
from shared.deps import DbSession
from shared.errors import ValidationFailed
from shared.http import problem_responses

router = APIRouter(prefix="/v1/providers", tags=["payment providers"])


async def _raw_body(request: Request) -> bytes:
    # The signature covers the exact bytes, so the body is read raw, before any parsing.
    return await request.body()


RawBody = Annotated[bytes, Depends(_raw_body)]


@router.post(
    "/{provider}/notifications",
    responses=problem_responses(
        notifications.SignatureInvalid, notifications.ProviderUnknown, ValidationFailed
    ),
)
def receive(provider: str, body: RawBody, request: Request, db: DbSession) -> dict[str, str]:
    """A signed capture or refund notice (header `X-Sandbox-Signature`, docs/billing.md).

    Answered 200 once applied or already known, so the provider stops retrying; duplicates and
    notices that overtake the synchronous answer have exactly one effect."""
    providers: dict[str, PaymentProvider] = request.app.state.runtime.providers
    notice = notifications.verify(
        providers.get(provider), body, request.headers.get("x-sandbox-signature")
    )
    return {"status": notifications.apply(db, request.app.state.settings, provider, notice)}
