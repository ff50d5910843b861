"""Merchants at a car park and the validations (停车券) they give their customers' parkings."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from services.billing.db import Base
from shared.db import new_id
from shared.pii_columns import Encrypted
from shared.timeutil import utcnow


class ValidationKind(StrEnum):
    minutes = "minutes"  # the billed stay ends `value` minutes earlier
    amount = "amount"  # `value` fen off the fee
    full = "full"  # the whole fee


class ValidationStatus(StrEnum):
    pending = "pending"  # on an open session; the merchant may still undo it
    applied = "applied"  # the session was billed with it: final, `applied_fen` is owed
    cancelled = "cancelled"  # undone by its merchant before the exit
    lapsed = "lapsed"  # the session closed without a post-pay charge: nothing to apply it to


class Merchant(Base):
    __tablename__ = "billing_merchant"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    lot_id: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(100))
    # The API key is shown once; only its SHA-256 is kept, and it is what a request is found by.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The key's first characters, so ops and the merchant can tell keys apart without the secret.
    key_prefix: Mapped[str] = mapped_column(String(16))
    # Validations this merchant may give one parking, and per Asia/Shanghai day.
    per_session_limit: Mapped[int] = mapped_column(default=1)
    daily_limit: Mapped[int] = mapped_column(default=500)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Validation(Base):
    __tablename__ = "billing_validation"
    __table_args__ = (
        Index("ix_billing_validation_merchant", "merchant_id", "created_at"),
        Index("ix_billing_validation_session", "session_id", "status"),
        Index("ix_billing_validation_applied", "merchant_id", "applied_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    merchant_id: Mapped[str] = mapped_column(String(36))
    lot_id: Mapped[str] = mapped_column(String(36))
    session_id: Mapped[str] = mapped_column(String(36))
    plate: Mapped[str] = mapped_column(Encrypted())  # at rest; never looked up by plate
    plate_color: Mapped[str] = mapped_column(String(10))
    kind: Mapped[ValidationKind] = mapped_column(String(10))
    # Minutes for `minutes`, fen for `amount`, 0 for `full`.
    value: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[ValidationStatus] = mapped_column(String(10), default=ValidationStatus.pending)
    charge_id: Mapped[str | None] = mapped_column(String(36), default=None)
    # What the validation took off the fee when the session was billed: the merchant owes it.
    applied_fen: Mapped[int | None] = mapped_column(BigInteger, default=None)
    applied_at: Mapped[datetime | None] = mapped_column(default=None)
    cancelled_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
