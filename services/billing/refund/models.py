"""Disputes raised by drivers and the refunds finance grants on them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Index, String
from sqlalchemy.orm import Mapped, mapped_column

from services.billing.db import Base
from shared.db import new_id
from shared.timeutil import utcnow


class DisputeStatus(StrEnum):
    open = "open"
    rejected = "rejected"
    refund_pending = "refund_pending"  # approved; the provider has not confirmed yet
    refunded = "refunded"
    refund_failed = "refund_failed"


class RefundStatus(StrEnum):
    pending = "pending"
    unknown = "unknown"  # no answer in time: query before any resend
    succeeded = "succeeded"
    failed = "failed"
    parked = "parked"  # set aside after repeated unexpected errors, until ops replay it


class Dispute(Base):
    __tablename__ = "billing_dispute"
    __table_args__ = (Index("ix_billing_dispute_charge", "charge_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    charge_id: Mapped[str] = mapped_column(String(36))
    driver_id: Mapped[str] = mapped_column(String(36), index=True)
    reason: Mapped[str] = mapped_column(String(1000))
    status: Mapped[DisputeStatus] = mapped_column(String(20), default=DisputeStatus.open)
    outcome: Mapped[str | None] = mapped_column(String(10), default=None)
    amount_fen: Mapped[int | None] = mapped_column(default=None)
    refund_id: Mapped[str | None] = mapped_column(String(36), default=None)
    decided_by: Mapped[str | None] = mapped_column(String(64), default=None)
    decided_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Refund(Base):
    """A refund of part of a captured charge; its id is the provider's `out_refund_no`."""

    __tablename__ = "billing_refund"
    __table_args__ = (Index("ix_billing_refund_work", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    charge_id: Mapped[str] = mapped_column(String(36), index=True)
    dispute_id: Mapped[str | None] = mapped_column(String(36), default=None)
    amount_fen: Mapped[int]
    # The commission the city gives back with this refund, fixed when the refund succeeds.
    commission_fen: Mapped[int] = mapped_column(default=0)
    status: Mapped[RefundStatus] = mapped_column(String(12), default=RefundStatus.pending)
    failure_code: Mapped[str | None] = mapped_column(String(60), default=None)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    refunded_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
