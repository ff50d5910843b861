"""The sandbox provider's own books: agreements, charges, refunds and outgoing notifications."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import make_base
from shared.timeutil import utcnow

Base = make_base("paysandbox")


class Agreement(Base):
    __tablename__ = "paysandbox_agreement"

    agreement_no: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    balance_fen: Mapped[int]
    behaviour: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default="active")  # active | cancelled
    calls: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SandboxCharge(Base):
    __tablename__ = "paysandbox_charge"

    out_trade_no: Mapped[str] = mapped_column(String(100), primary_key=True)
    trade_no: Mapped[str] = mapped_column(String(64), unique=True)
    agreement_no: Mapped[str] = mapped_column(String(64), index=True)
    amount_fen: Mapped[int]
    status: Mapped[str] = mapped_column(String(20))
    failure_code: Mapped[str | None] = mapped_column(String(60), default=None)
    description: Mapped[str] = mapped_column(String(200), default="")
    captured_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    notify_url: Mapped[str | None] = mapped_column(String(500), default=None)


class SandboxRefund(Base):
    """A refund of (part of) a captured charge, keyed by the caller's `out_refund_no`."""

    __tablename__ = "paysandbox_refund"

    out_refund_no: Mapped[str] = mapped_column(String(100), primary_key=True)
    out_trade_no: Mapped[str] = mapped_column(String(100), index=True)
    amount_fen: Mapped[int]
    status: Mapped[str] = mapped_column(String(20))  # succeeded
    refunded_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SandboxNotification(Base):
    """One delivery of an asynchronous notification, retried until the receiver answers 2xx.

    `duplicate_notify` agreements get two deliveries with the same `notify_id`, as real
    providers do when an acknowledgement is lost.
    """

    __tablename__ = "paysandbox_notification"
    __table_args__ = (Index("ix_paysandbox_notification_due", "delivered_at", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    notify_id: Mapped[str] = mapped_column(String(64), index=True)
    url: Mapped[str] = mapped_column(String(500))
    body: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(String(300), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
