from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.billing.merchant.models import ValidationKind

MAX_MINUTES = 7 * 24 * 60  # a week: the longest stay worth validating by time
MAX_AMOUNT_FEN = 1_000_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MerchantCreate(Strict):
    # A UUID, so a malformed id is refused here rather than asked of the lots service.
    lot_id: UUID
    name: str = Field(min_length=1, max_length=100, examples=["观前街书店"])
    per_session_limit: int = Field(default=1, ge=1, le=20)
    daily_limit: int = Field(default=500, ge=1, le=100_000)


class MerchantOut(BaseModel):
    id: str
    lot_id: str
    name: str
    key_prefix: str
    per_session_limit: int
    daily_limit: int
    created_at: datetime


class MerchantCreated(MerchantOut):
    """The only answer that carries the API key: it is stored hashed and never shown again."""

    api_key: str


class ValidationCreate(Strict):
    plate: str = Field(examples=["苏E12345"])
    plate_color: str = Field(examples=["blue"])
    kind: ValidationKind
    value: int = Field(
        default=0,
        ge=0,
        le=MAX_AMOUNT_FEN,
        description="minutes for `minutes`, fen for `amount`; ignored (0) for `full`",
    )

    @model_validator(mode="after")
    def _value_fits_kind(self) -> ValidationCreate:
        if self.kind is ValidationKind.minutes and not 1 <= self.value <= MAX_MINUTES:
            raise ValueError(f"minutes must be between 1 and {MAX_MINUTES}")
        if self.kind is ValidationKind.amount and self.value < 1:
            raise ValueError("an amount must be at least 1 fen")
        if self.kind is ValidationKind.full:
            self.value = 0
        return self


class ValidationOut(BaseModel):
    id: str
    merchant_id: str
    lot_id: str
    session_id: str
    plate: str
    plate_color: str
    kind: str
    value: int
    status: str
    charge_id: str | None
    applied_fen: int | None
    applied_at: datetime | None
    cancelled_at: datetime | None
    created_at: datetime


class StatementLine(BaseModel):
    validation_id: str
    applied_at: datetime
    session_id: str
    charge_id: str | None
    plate: str
    kind: str
    value: int
    applied_fen: int


class Statement(BaseModel):
    merchant_id: str
    merchant_name: str
    month: str
    validations: int
    total_fen: int
    lines: list[StatementLine]
