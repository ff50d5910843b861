"""Bearer tokens: drivers' JWTs, admins' JWTs (with a role) and the internal service token.

Every service verifies tokens itself (stateless, HS256), so the same routers work behind the
gateway and inside the embedded single app.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

import jwt
from fastapi import Depends, Request

from shared.errors import Forbidden, Unauthorized

ISSUER = "citypark"


class Role(StrEnum):
    admin = "admin"
    finance = "finance"
    viewer = "viewer"


@dataclass(frozen=True)
class Driver:
    id: str


@dataclass(frozen=True)
class Admin:
    id: str
    role: Role


def issue_driver_token(secret: str, driver_id: str, ttl_s: int) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": driver_id, "kind": "driver", "iat": now, "exp": now + ttl_s}
    return jwt.encode(claims, secret, algorithm="HS256")


def issue_admin_token(secret: str, role: Role, ttl_s: int | None = None) -> tuple[str, str]:
    """Returns (token, token id). Only the token's hash is stored, for audit and revocation."""
    jti = uuid.uuid4().hex
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": ISSUER,
        "sub": f"admin:{jti}",
        "kind": "admin",
        "role": role.value,
        "jti": jti,
        "iat": now,
    }
    if ttl_s:
        claims["exp"] = now + ttl_s
    return jwt.encode(claims, secret, algorithm="HS256"), jti


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def internal_token(secret: str) -> str:
    """Services calling each other present this; derived so there is one secret to manage."""
    return hmac.new(secret.encode(), b"citypark-internal", hashlib.sha256).hexdigest()


def _decode(secret: str, token: str) -> dict[str, object]:
    try:
        return jwt.decode(token, secret, algorithms=["HS256"], issuer=ISSUER)
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("The token has expired", code_hint="token_expired") from exc
    except jwt.PyJWTError as exc:
        raise Unauthorized("The bearer token is not valid") from exc


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("A bearer token is required")
    return token.strip()


def _secret(request: Request) -> str:
    return request.app.state.settings.jwt_secret.get_secret_value()  # type: ignore[no-any-return]


def authenticate_driver(request: Request) -> Driver:
    claims = _decode(_secret(request), _bearer(request))
    if claims.get("kind") != "driver":
        raise Forbidden("This endpoint is for drivers")
    return Driver(id=str(claims["sub"]))


def authenticate_admin(request: Request) -> Admin:
    claims = _decode(_secret(request), _bearer(request))
    if claims.get("kind") != "admin":
        raise Forbidden("This endpoint is for city ops")
    try:
        role = Role(str(claims.get("role")))
    except ValueError as exc:
        raise Forbidden("Unknown role") from exc
    return Admin(id=str(claims["jti"]), role=role)


def require_roles(*roles: Role) -> object:
    def check(admin: Annotated[Admin, Depends(authenticate_admin)]) -> Admin:
        if admin.role not in roles:
            raise Forbidden(f"Needs one of the roles: {', '.join(r.value for r in roles)}")
        return admin

    return check


def authenticate_internal(request: Request) -> None:
    presented = request.headers.get("x-citypark-internal", "")
    if not hmac.compare_digest(presented, internal_token(_secret(request))):
        raise Unauthorized("Internal endpoint")


DriverAuth = Annotated[Driver, Depends(authenticate_driver)]
AdminAuth = Annotated[Admin, Depends(require_roles(Role.admin))]
FinanceAuth = Annotated[Admin, Depends(require_roles(Role.admin, Role.finance))]
ViewerAuth = Annotated[Admin, Depends(require_roles(Role.admin, Role.finance, Role.viewer))]
InternalAuth = Annotated[None, Depends(authenticate_internal)]
