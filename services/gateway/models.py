from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import make_base
from shared.timeutil import utcnow

Base = make_base("gateway")


class AdminToken(Base):
    """Admin tokens are stored hashed only: the token itself is shown once."""

    __tablename__ = "gateway_admin_token"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    note: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    name: Mapped[str] = mapped_column(String(200), default="", server_default="")
