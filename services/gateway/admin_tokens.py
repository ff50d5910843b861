from __future__ import annotations

from sqlalchemy.orm import Session

from services.gateway.models import AdminToken
from shared.auth import Role, issue_admin_token, token_hash


def create(db: Session, secret: str, role: Role, note: str = "") -> str:
    token, jti = issue_admin_token(secret, role)
    db.add(AdminToken(jti=jti, token_hash=token_hash(token), role=role.value, note=note))
    db.flush()
    return token
