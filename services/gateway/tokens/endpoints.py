"""`/v1/admin/tokens`: the admin tokens there are, and revoking one. Tokens are issued by the
CLI (`citypark admin token`), which prints each one once."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status

from services.gateway.tokens import service
from services.gateway.tokens.schemas import RevokedToken, RevokedTokens, TokenOut
from shared.auth import AdminAuth, InternalAuth
from shared.deps import DbSession
from shared.errors import Forbidden, TokenExpired, TokenRevoked, Unauthorized
from shared.http import problem_responses
from shared.runtime import Runtime
from shared.timeutil import utcnow

router = APIRouter(prefix="/v1/admin", tags=["admin: tokens"])
internal = APIRouter(prefix="/internal/admin-tokens", include_in_schema=False)
AUTH_PROBLEMS = (Unauthorized, TokenExpired, TokenRevoked, Forbidden)


@router.get("/tokens", response_model=list[TokenOut], responses=problem_responses(*AUTH_PROBLEMS))
def list_tokens(
    _: AdminAuth, db: DbSession, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> list[TokenOut]:
    """Admin tokens, newest first: who holds each, its role, when it expires, whether it was
    revoked. The tokens themselves are never stored, so never shown."""
    now = utcnow()
    return [
        TokenOut(
            jti=t.jti,
            role=t.role,
            name=t.name,
            note=t.note,
            created_at=t.created_at,
            expires_at=t.expires_at,
            revoked_at=t.revoked_at,
            active=service.is_active(t, now),
        )
        for t in service.listing(db, limit=limit)
    ]


@router.delete(
    "/tokens/{jti}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problem_responses(service.TokenUnknown, *AUTH_PROBLEMS),
)
def revoke_token(
    jti: Annotated[str, Path(max_length=64)],
    who: AdminAuth,
    db: DbSession,
    request: Request,
) -> Response:
    """Revoke a token: every service answers it 401 `token_revoked` within seconds. Revoking
    a revoked token again changes nothing."""
    rt: Runtime = request.app.state.runtime
    service.revoke(db, jti, who, on_commit=rt.revocations.add)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@internal.get("/revoked", response_model=RevokedTokens)
def revoked_tokens(_: InternalAuth, db: DbSession) -> RevokedTokens:
    """What each service's revocation list is refreshed from."""
    return RevokedTokens(
        revoked=[RevokedToken(jti=j, expires_at=e) for j, e in service.revoked_until(db)]
    )
