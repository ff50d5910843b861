"""Bearer tokens: drivers' JWTs, admins' JWTs (with a role) and the internal service token.

Every service verifies tokens itself (HS256), so the same routers work behind the gateway and
inside the embedded single app. Driver tokens, admin tokens and the internal token each have a
key of their own, derived from the master secret (shared/keys.py); tokens made under the
secret's previous values (`jwt_secret_previous`) are still accepted while it is rotated.

Admin tokens always expire (`exp`) and can be revoked: the gateway keeps them (by `jti`), and
each process holds the list of revoked, unexpired ids, at most `REVOCATIONS_MAX_AGE_S` old
(`Revocations`). Functions that take a `secret` take the master secret.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

import httpx
import jwt
import structlog
from fastapi import Depends, Request

from shared.errors import Forbidden, TokenExpired, TokenRevoked, Unauthorized
from shared.keys import Purpose, derive, derive_hex

log = structlog.get_logger(__name__)

ISSUER = "citypark"
INTERNAL_HEADER = "x-citypark-internal"
DEFAULT_ADMIN_TOKEN_TTL_S = 8 * 3600
# How old a process's list of revoked admin tokens may be before it asks again: a revoked
# token stops working everywhere within this (and one fetch timeout).
REVOCATIONS_MAX_AGE_S = 5.0
REVOCATIONS_FETCH_TIMEOUT_S = 2.0
REVOKED_PATH = "/internal/admin-tokens/revoked"
# Drivers' "tokens valid after" times changed within the token lifetime, served by billing.
DRIVER_CUTOFFS_PATH = "/internal/billing/drivers/token-cutoffs"
ISSUED_MS_CLAIM = "iat_ms"

_PURPOSE_OF_KIND = {"driver": Purpose.driver_tokens, "admin": Purpose.admin_tokens}


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


@dataclass(frozen=True)
class IssuedAdminToken:
    token: str
    jti: str
    expires_at: datetime


def issue_driver_token(secret: str, driver_id: str, ttl_s: int) -> str:
    issued = time.time()
    now = int(issued)
    claims = {
        "iss": ISSUER,
        "sub": driver_id,
        "kind": "driver",
        "iat": now,
        "exp": now + ttl_s,
        # `iat` has whole seconds only: a sign-in in the same second as "log out everywhere"
        # must still be told apart from the tokens that call revoked.
        ISSUED_MS_CLAIM: int(issued * 1000),
    }
    return jwt.encode(claims, derive(secret, Purpose.driver_tokens), algorithm="HS256")


def new_admin_token(
    secret: str, role: Role, ttl_s: int = DEFAULT_ADMIN_TOKEN_TTL_S
) -> IssuedAdminToken:
    """A new admin token that expires after `ttl_s`; record its `jti` to make it revocable."""
    if ttl_s <= 0:
        raise ValueError("an admin token needs a positive lifetime")
    jti = uuid.uuid4().hex
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": ISSUER,
        "sub": f"admin:{jti}",
        "kind": "admin",
        "role": role.value,
        "jti": jti,
        "iat": now,
        "exp": now + ttl_s,
    }
    token = jwt.encode(claims, derive(secret, Purpose.admin_tokens), algorithm="HS256")
    return IssuedAdminToken(token, jti, datetime.fromtimestamp(now + ttl_s, UTC))


def issue_admin_token(secret: str, role: Role, ttl_s: int | None = None) -> tuple[str, str]:
    """Returns (token, token id). Only the token's hash is stored, for audit and revocation."""
    issued = new_admin_token(secret, role, ttl_s or DEFAULT_ADMIN_TOKEN_TTL_S)
    return issued.token, issued.jti


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def internal_token(secret: str) -> str:
    """Services calling each other present this; derived so there is one secret to manage."""
    return derive_hex(secret, Purpose.internal_token)


def _masters(request: Request) -> list[str]:
    """The master secret, then its previous values (accepted while it is rotated)."""
    settings = request.app.state.settings
    return [settings.jwt_secret.get_secret_value()] + [
        s.get_secret_value() for s in settings.jwt_secret_previous
    ]


def _decode(masters: list[str], token: str) -> dict[str, object]:
    """Verified claims. The `kind` claim picks the key, and the signature covers the claim, so
    a token can only be of the kind whose key signed it."""
    try:
        kind = jwt.decode(token, options={"verify_signature": False}).get("kind")
    except jwt.PyJWTError as exc:
        raise Unauthorized("The bearer token is not valid") from exc
    purpose = _PURPOSE_OF_KIND.get(str(kind))
    if purpose is None:
        raise Unauthorized("The bearer token is not valid")
    for master in masters:
        try:
            return jwt.decode(
                token,
                derive(master, purpose),
                algorithms=["HS256"],
                issuer=ISSUER,
                options={"require": ["exp", "iat"]},
            )
        except jwt.InvalidSignatureError:
            continue  # perhaps signed under a previous secret
        except jwt.ExpiredSignatureError as exc:
            raise TokenExpired() from exc
        except jwt.MissingRequiredClaimError as exc:
            # Admin tokens issued before they expired: they are refused, never trusted forever.
            raise TokenExpired(
                "The token has no expiry; tokens without one are no longer accepted, ask for "
                "a new one"
            ) from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized("The bearer token is not valid") from exc
    raise Unauthorized("The bearer token is not valid")


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("A bearer token is required")
    return token.strip()


def authenticate_driver(request: Request) -> Driver:
    claims = _decode(_masters(request), _bearer(request))
    if claims.get("kind") != "driver":
        raise Forbidden("This endpoint is for drivers")
    driver_id = str(claims["sub"])
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is not None:
        cutoff = runtime.driver_cutoffs.cutoff(driver_id)
        if cutoff is not None and issued_ms(claims) <= cutoff:
            raise TokenRevoked("This token was revoked: sign in again")
    return Driver(id=driver_id)


def issued_ms(claims: dict[str, object]) -> int:
    """When the token was issued, in Unix milliseconds (`iat` for tokens made before the
    millisecond claim: the start of its second, so such a token never outlives a cut-off)."""
    value = claims.get(ISSUED_MS_CLAIM)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    iat = claims.get("iat")
    return int(iat) * 1000 if isinstance(iat, int | float) else 0


def authenticate_admin(request: Request) -> Admin:
    claims = _decode(_masters(request), _bearer(request))
    if claims.get("kind") != "admin":
        raise Forbidden("This endpoint is for city ops")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise Unauthorized("The bearer token is not valid")
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is not None and runtime.revocations.is_revoked(jti):
        raise TokenRevoked()
    try:
        role = Role(str(claims.get("role")))
    except ValueError as exc:
        raise Forbidden("Unknown role") from exc
    return Admin(id=jti, role=role)


def require_roles(*roles: Role) -> object:
    def check(admin: Annotated[Admin, Depends(authenticate_admin)]) -> Admin:
        if admin.role not in roles:
            raise Forbidden(f"Needs one of the roles: {', '.join(r.value for r in roles)}")
        return admin

    return check


def authenticate_internal(request: Request) -> None:
    presented = request.headers.get(INTERNAL_HEADER, "")
    if not any(hmac.compare_digest(presented, internal_token(m)) for m in _masters(request)):
        raise Unauthorized("Internal endpoint")


# jti → when the token would have expired anyway (Unix seconds): past that it needs no listing.
RevokedSource = Callable[[], dict[str, float]]


class Revocations:
    """The revoked, unexpired admin tokens one process knows of.

    Read on every admin request and refreshed from `source` when older than `max_age_s`: a
    revocation anywhere is seen here within that. When the source cannot be reached the last
    known list is kept (revocations already seen stay in force), the outage is logged once, and
    the next attempt waits another `max_age_s`, so admin requests never queue behind a dead
    gateway for more than one fetch timeout per period.
    """

    def __init__(
        self,
        source: RevokedSource,
        *,
        max_age_s: float = REVOCATIONS_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._max_age_s = max_age_s
        self._clock = clock
        self._fetched: dict[str, float] = {}
        self._added: dict[str, float] = {}  # revoked by this process: in force at once
        self._checked_at: float | None = None
        self._failing = False
        self._lock = threading.Lock()

    def add(self, jti: str, expires_at: float) -> None:
        with self._lock:
            self._added[jti] = expires_at

    def is_revoked(self, jti: str) -> bool:
        self._refresh()
        now = time.time()
        with self._lock:
            for known in (self._fetched, self._added):
                if jti in known and known[jti] > now:
                    return True
        return False

    def _stale(self) -> bool:
        return self._checked_at is None or self._clock() - self._checked_at >= self._max_age_s

    def _refresh(self) -> None:
        if not self._stale():
            return
        with self._lock:
            if not self._stale():  # another request refreshed it while this one waited
                return
            try:
                fetched = self._source()
            except Exception as exc:  # any failure: keep what we know
                if not self._failing:
                    log.warning("auth.revocations_unavailable", error=repr(exc)[:300])
                    self._failing = True
            else:
                if self._failing:
                    log.info("auth.revocations_available")
                    self._failing = False
                now = time.time()
                self._fetched = fetched
                self._added = {j: e for j, e in self._added.items() if e > now}
            self._checked_at = self._clock()


def gateway_revocations(gateway_url: str, secret: str) -> RevokedSource:
    """Fetches the revoked tokens from the gateway's internal API (services other than it)."""
    client = httpx.Client(
        base_url=gateway_url.rstrip("/"),
        timeout=REVOCATIONS_FETCH_TIMEOUT_S,
        headers={INTERNAL_HEADER: internal_token(secret)},
    )

    def fetch() -> dict[str, float]:
        answer = client.get(REVOKED_PATH)
        answer.raise_for_status()
        return {
            str(item["jti"]): datetime.fromisoformat(item["expires_at"]).timestamp()
            for item in answer.json()["revoked"]
        }

    return fetch


# driver id → the Unix millisecond up to which that driver's tokens are refused.
CutoffSource = Callable[[], dict[str, int]]


class DriverCutoffs:
    """Per-driver "tokens valid after" times one process knows of ("log out everywhere",
    account deletion). Refreshed from `source` when older than `max_age_s`, as `Revocations`
    is: a cut-off set anywhere is seen here within that; one set by this process (`add`) at
    once. When the source cannot be reached the last known times stay in force."""

    def __init__(
        self,
        source: CutoffSource,
        *,
        max_age_s: float = REVOCATIONS_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._max_age_s = max_age_s
        self._clock = clock
        self._fetched: dict[str, int] = {}
        self._added: dict[str, int] = {}
        self._checked_at: float | None = None
        self._failing = False
        self._lock = threading.Lock()

    def add(self, driver_id: str, cutoff_ms: int) -> None:
        with self._lock:
            self._added[driver_id] = max(cutoff_ms, self._added.get(driver_id, 0))

    def cutoff(self, driver_id: str) -> int | None:
        self._refresh()
        with self._lock:
            known = [c for c in (self._fetched.get(driver_id), self._added.get(driver_id)) if c]
        return max(known) if known else None

    def _stale(self) -> bool:
        return self._checked_at is None or self._clock() - self._checked_at >= self._max_age_s

    def _refresh(self) -> None:
        if not self._stale():
            return
        with self._lock:
            if not self._stale():
                return
            try:
                fetched = self._source()
            except Exception as exc:  # any failure: keep what we know
                if not self._failing:
                    log.warning("auth.driver_cutoffs_unavailable", error=repr(exc)[:300])
                    self._failing = True
            else:
                if self._failing:
                    log.info("auth.driver_cutoffs_available")
                    self._failing = False
                self._fetched = fetched
            self._checked_at = self._clock()


def billing_cutoffs(billing_url: str, secret: str) -> CutoffSource:
    """Fetches drivers' token cut-offs from billing's internal API (services other than it)."""
    client = httpx.Client(
        base_url=billing_url.rstrip("/"),
        timeout=REVOCATIONS_FETCH_TIMEOUT_S,
        headers={INTERNAL_HEADER: internal_token(secret)},
    )

    def fetch() -> dict[str, int]:
        answer = client.get(DRIVER_CUTOFFS_PATH)
        answer.raise_for_status()
        return {str(item["driver_id"]): int(item["cutoff_ms"]) for item in answer.json()["cutoffs"]}

    return fetch


DriverAuth = Annotated[Driver, Depends(authenticate_driver)]
AdminAuth = Annotated[Admin, Depends(require_roles(Role.admin))]
FinanceAuth = Annotated[Admin, Depends(require_roles(Role.admin, Role.finance))]
ViewerAuth = Annotated[Admin, Depends(require_roles(Role.admin, Role.finance, Role.viewer))]
InternalAuth = Annotated[None, Depends(authenticate_internal)]
