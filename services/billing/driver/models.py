"""Drivers, their sign-in codes and their single payment account (vehicles: `vehicle`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from services.billing.db import Base
from shared.db import new_id
from shared.pii_columns import INDEX_LENGTH, Encrypted, EncryptedText, keep_blind_index
from shared.timeutil import utcnow


class Driver(Base):
    __tablename__ = "billing_driver"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    # Phones are encrypted at rest; the blind index finds a driver at sign-in and keeps one
    # driver per phone.
    phone: Mapped[str] = mapped_column(Encrypted())
    phone_bidx: Mapped[str] = mapped_column(String(INDEX_LENGTH), unique=True)
    # Bumped on every change of post-pay state; consumers keep the newest snapshot.
    state_version: Mapped[int] = mapped_column(default=0)
    # The post-pay state last published, so the periodic arrears check only speaks on change.
    postpay_published: Mapped[str | None] = mapped_column(String(12), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Every token of the driver issued up to this time is refused (log out everywhere, deletion).
    tokens_valid_after: Mapped[datetime | None] = mapped_column(default=None, index=True)
    # Personal data erased at the driver's request; the row stays as the money records' anchor.
    erased_at: Mapped[datetime | None] = mapped_column(default=None)


class OtpChallenge(Base):
    __tablename__ = "billing_otp"
    __table_args__ = (Index("ix_billing_otp_phone", "phone_bidx", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    phone: Mapped[str] = mapped_column(Encrypted())
    phone_bidx: Mapped[str] = mapped_column(String(INDEX_LENGTH))
    code_hash: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(default=0)
    used_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SmsMessage(Base):
    """The sandbox SMS outbox: what the SMS port would have sent."""

    __tablename__ = "billing_sms"
    __table_args__ = (Index("ix_billing_sms_phone", "phone_bidx", "sent_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    phone: Mapped[str] = mapped_column(Encrypted())
    phone_bidx: Mapped[str] = mapped_column(String(INDEX_LENGTH))
    # The text holds a sign-in code or the driver's own data: encrypted as well.
    body: Mapped[str] = mapped_column(EncryptedText())
    sent_at: Mapped[datetime] = mapped_column(default=utcnow)


class PaymentAccount(Base):
    __tablename__ = "billing_payment_account"

    driver_id: Mapped[str] = mapped_column(ForeignKey("billing_driver.id"), primary_key=True)
    provider: Mapped[str] = mapped_column(String(40))
    agreement_no: Mapped[str] = mapped_column(String(100))
    masked_account: Mapped[str] = mapped_column(String(100))
    bound_at: Mapped[datetime] = mapped_column(default=utcnow)


keep_blind_index(Driver, "phone", "phone")
keep_blind_index(OtpChallenge, "phone", "phone")
keep_blind_index(SmsMessage, "phone", "phone")
