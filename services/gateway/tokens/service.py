"""Issuing, listing and revoking admin tokens; the gateway's table is where revocations live."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from services.gateway.models import AdminToken
from shared import audit
from shared.auth import (
    DEFAULT_ADMIN_TOKEN_TTL_S,
    Admin,
    IssuedAdminToken,
    RevokedSource,
    Role,
    new_admin_token,
    token_hash,
)
from shared.errors import problem
from shared.timeutil import utcnow

SERVICE = "gateway"
ENTITY = "admin_token"
# Who issues tokens from the command line (there is no token yet to name the actor by).
CLI_ACTOR = Admin(id="cli", role=Role.admin)

TokenUnknown = problem(404, "token_unknown", "No admin token with this id")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL_S = 90 * 86400  # a token for a quarter, at most: ops renew rather than hold forever


def parse_ttl(text: str) -> int:
    """`30m`, `8h`, `7d` (or `90s`) as seconds; ValueError says what is accepted."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*([smhd])\s*", text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not a lifetime: use e.g. 30m, 8h or 7d")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < seconds <= MAX_TTL_S:
        raise ValueError(f"{text!r}: a token lives between 1 s and {MAX_TTL_S // 86400} days")
    return seconds


def _view(t: AdminToken) -> dict[str, str | None]:
    return {
        "role": t.role,
        "name": t.name,
        "note": t.note,
        "expires_at": t.expires_at.isoformat() if t.expires_at else None,
        "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
    }


def issue(
    db: Session,
    secret: str,
    role: Role,
    *,
    ttl_s: int = DEFAULT_ADMIN_TOKEN_TTL_S,
    name: str = "",
    note: str = "",
    actor: Admin = CLI_ACTOR,
) -> IssuedAdminToken:
    """A new token, recorded by its id and hash (never the token) and audited."""
    issued = new_admin_token(secret, role, ttl_s)
    row = AdminToken(
        jti=issued.jti,
        token_hash=token_hash(issued.token),
        role=role.value,
        name=name,
        note=note,
        expires_at=issued.expires_at,
    )
    db.add(row)
    db.flush()
    audit.record(
        db,
        actor,
        service=SERVICE,
        action="issue",
        entity=ENTITY,
        entity_id=row.jti,
        after=_view(row),
    )
    return issued


def create(db: Session, secret: str, role: Role, note: str = "") -> str:
    """A token of the default lifetime (what tests and scripts need)."""
    return issue(db, secret, role, note=note).token


def listing(db: Session, *, limit: int = 100) -> list[AdminToken]:
    query = select(AdminToken).order_by(AdminToken.created_at.desc(), AdminToken.jti).limit(limit)
    return list(db.scalars(query))


def is_active(t: AdminToken, now: datetime | None = None) -> bool:
    now = now or utcnow()
    return t.revoked_at is None and t.expires_at is not None and t.expires_at > now


def revoke(
    db: Session,
    jti: str,
    actor: Admin,
    *,
    reason: str | None = None,
    on_commit: Callable[[str, float], None] | None = None,
) -> AdminToken:
    """Revoke the token (again: nothing changes). `on_commit(jti, expires_at)` runs once the
    revocation is committed, so this process refuses the token at once."""
    row = db.get(AdminToken, jti, with_for_update=True)
    if row is None:
        raise TokenUnknown(f"No admin token {jti!r}")
    if row.revoked_at is None:
        before = _view(row)
        row.revoked_at = utcnow()
        db.flush()
        audit.record(
            db,
            actor,
            service=SERVICE,
            action="revoke",
            entity=ENTITY,
            entity_id=jti,
            before=before,
            after=_view(row),
            reason=reason,
        )
    if on_commit is not None and row.expires_at is not None:
        expires = row.expires_at.timestamp()
        event.listen(db, "after_commit", lambda _db: on_commit(jti, expires), once=True)
    return row


def revoked_until(db: Session) -> list[tuple[str, datetime]]:
    """The revoked tokens still within their lifetime, with their expiry (past it a token is
    refused anyway, so the list stays short)."""
    rows = db.execute(
        select(AdminToken.jti, AdminToken.expires_at)
        .where(AdminToken.revoked_at.is_not(None), AdminToken.expires_at > utcnow())
        .order_by(AdminToken.expires_at)
    )
    return [(jti, expires) for jti, expires in rows if expires is not None]


def revoked(db: Session) -> dict[str, float]:
    """The same as jti → expiry in Unix seconds, the shape `shared.auth.Revocations` keeps."""
    return {jti: expires.timestamp() for jti, expires in revoked_until(db)}


def table_source(factory: sessionmaker[Session]) -> RevokedSource:
    """Revocations read straight from the table, for the processes that serve the gateway."""

    def read() -> dict[str, float]:
        with factory() as db:
            return revoked(db)

    return read
