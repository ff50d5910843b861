"""Notifications to drivers: what was said (once per source event), and its deliveries."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from services.billing.db import Base
from shared.db import new_id
from shared.timeutil import utcnow


class NotificationKind(StrEnum):
    entry = "entry"  # entered a car park on post-pay
    exit = "exit"  # left, with the fee
    charge_captured = "charge_captured"
    charge_declined = "charge_declined"  # now in arrears
    suspended = "suspended"  # post-pay suspended for arrears
    restored = "restored"  # post-pay back
    refund = "refund"
    vehicle_superseded = "vehicle_superseded"  # another driver proved ownership of a plate


class Channel(StrEnum):
    sms = "sms"
    webhook = "webhook"


class DeliveryStatus(StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"  # gave up after the last retry
    parked = "parked"  # set aside after repeated unexpected errors, until ops replay it


class Notification(Base):
    __tablename__ = "billing_notification"
    __table_args__ = (
        # The same source event, however often delivered to us, is one notification.
        UniqueConstraint("driver_id", "dedupe_key"),
        Index("ix_billing_notification_driver", "driver_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    driver_id: Mapped[str] = mapped_column(String(36))
    kind: Mapped[NotificationKind] = mapped_column(String(20))
    dedupe_key: Mapped[str] = mapped_column(String(200))
    title: Mapped[str] = mapped_column(String(100))
    body: Mapped[str] = mapped_column(String(500))
    plate: Mapped[str | None] = mapped_column(String(20), default=None)  # masked
    amount_fen: Mapped[int | None] = mapped_column(default=None)
    ref_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Delivery(Base):
    """One notification through one channel; retried with backoff until it is acknowledged."""

    __tablename__ = "billing_notification_delivery"
    __table_args__ = (
        UniqueConstraint("notification_id", "channel"),
        Index("ix_billing_notification_delivery_work", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    notification_id: Mapped[str] = mapped_column(String(36))
    channel: Mapped[Channel] = mapped_column(String(10))
    target: Mapped[str] = mapped_column(String(500))
    status: Mapped[DeliveryStatus] = mapped_column(String(12), default=DeliveryStatus.pending)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(String(300), default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Preference(Base):
    __tablename__ = "billing_notification_pref"

    driver_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # {"muted": ["entry", ...]}
    settings: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Webhook(Base):
    """The one URL a driver registered; its signing secret derives from the id (never stored)."""

    __tablename__ = "billing_webhook"

    driver_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    id: Mapped[str] = mapped_column(String(36), default=new_id, unique=True)
    url: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PostpayWatch(Base):
    """The post-pay state last seen per driver, so suspension and restore are told on change."""

    __tablename__ = "billing_notification_postpay"

    driver_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    version: Mapped[int]
    postpay: Mapped[str] = mapped_column(String(12))
