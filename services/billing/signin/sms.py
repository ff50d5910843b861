"""The SMS port sign-in codes leave through.

In sandbox mode the message lands in the sandbox SMS outbox (`billing_sms`), which admins read
at `/v1/admin/sandbox/sms`. Outside sandbox mode nothing of the message is stored: it goes to
the SMS gateway plugged in as `app.state.sms_port`, and with none plugged in no code is sent
(503 `sms_unavailable`) rather than a code that goes nowhere.
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy.orm import Session

from services.billing.driver.models import SmsMessage


class SmsPort(Protocol):
    def send(self, db: Session, phone: str, text: str) -> None:
        """Send `text` to `phone`. `db` is the request's transaction (for ports that write)."""
        ...


class SandboxOutbox:
    """Sandbox mode only: what the SMS port would have sent, kept for admins to read."""

    def send(self, db: Session, phone: str, text: str) -> None:
        db.add(SmsMessage(phone=phone, body=text))
