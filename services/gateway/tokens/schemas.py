from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class TokenOut(BaseModel):
    """An admin token as ops see it: never the token itself (only its hash is stored)."""

    jti: str = Field(description="The token's id (its `jti` claim); revoke by it")
    role: str = Field(examples=["admin"])
    name: str = Field(description="Who holds the token")
    note: str
    created_at: datetime
    expires_at: datetime | None = Field(
        description="None only for tokens issued before tokens expired; those are refused"
    )
    revoked_at: datetime | None
    active: bool = Field(description="Accepted now: not revoked and not expired")


class RevokedToken(BaseModel):
    jti: str
    expires_at: datetime


class RevokedTokens(BaseModel):
    """The revoked tokens that have not expired yet (each service refuses them)."""

    revoked: list[RevokedToken]
