"""A charge: one per closed post-pay session, taken from the driver's bound account."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Index, String
from sqlalchemy.orm import Mapped, mapped_column

from services.billing.db import Base
from shared.db import new_id
from shared.pii_columns import Encrypted
from shared.timeutil import utcnow


class ChargeStatus(StrEnum):
    pending = "pending"  # not yet sent, or to be sent again
    unknown = "unknown"  # the provider did not answer: query before any retry
    captured = "captured"
    declined = "declined"  # arrears until paid
    free = "free"  # nothing to pay (free minutes, passes)
    parked = "parked"  # set aside after repeated unexpected errors, until ops replay it


class Charge(Base):
    __tablename__ = "billing_charge"
    __table_args__ = (
        Index("ix_billing_charge_driver", "driver_id", "created_at"),
        Index("ix_billing_charge_work", "status", "next_attempt_at"),
        Index("ix_billing_charge_district", "district", "status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    # One closed session → exactly one charge, however often the exit is delivered.
    session_id: Mapped[str] = mapped_column(String(36), unique=True)
    driver_id: Mapped[str] = mapped_column(String(36))
    lot_id: Mapped[str] = mapped_column(String(36))
    lot_code: Mapped[str] = mapped_column(String(64))
    operator_id: Mapped[str] = mapped_column(String(36))
    # The lot's district when the session closed, for the city's per-district figures. Charges
    # opened before it was recorded have none; they count in the city's totals only.
    district: Mapped[str | None] = mapped_column(String(40), default=None)
    plate: Mapped[str] = mapped_column(Encrypted())  # at rest; never looked up by plate
    plate_color: Mapped[str] = mapped_column(String(10))
    entered_at: Mapped[datetime]
    exited_at: Mapped[datetime]
    amount_fen: Mapped[int]
    # The operator's commission rate when the stay was priced; the capture books it.
    commission_bps: Mapped[int] = mapped_column(default=0)
    # Sum of succeeded refunds (a per-charge counter; the ledger holds the money itself).
    refunded_fen: Mapped[int] = mapped_column(default=0)
    # Merchants' validations taken off the priced stay (the fee before them: amount + validated).
    validated_fen: Mapped[int] = mapped_column(default=0, server_default="0")
    breakdown: Mapped[dict[str, Any]]
    status: Mapped[ChargeStatus] = mapped_column(String(12), default=ChargeStatus.pending)
    provider: Mapped[str | None] = mapped_column(String(40), default=None)
    agreement_no: Mapped[str | None] = mapped_column(String(100), default=None)
    provider_trade_no: Mapped[str | None] = mapped_column(String(100), default=None)
    failure_code: Mapped[str | None] = mapped_column(String(60), default=None)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    captured_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def out_trade_no(self) -> str:
        """The provider's idempotency key is the charge id itself."""
        return self.id
