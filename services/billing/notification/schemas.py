from __future__ import annotations

from datetime import datetime

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from services.billing.notification.models import NotificationKind


class DeliveryOut(BaseModel):
    channel: str
    status: str
    attempts: int
    delivered_at: datetime | None


class NotificationOut(BaseModel):
    id: str
    kind: NotificationKind
    title: str
    body: str
    plate: str | None
    amount_fen: int | None
    ref_id: str | None
    created_at: datetime
    deliveries: list[DeliveryOut] = []


class Preferences(BaseModel):
    model_config = ConfigDict(extra="forbid")

    muted: list[NotificationKind] = Field(default_factory=list, examples=[["entry"]])


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl = Field(examples=["https://example.com/citypark/hooks"])


class WebhookOut(BaseModel):
    id: str
    url: str
    # Verify each delivery's `x-citypark-signature` with it (HMAC-SHA256, see docs/billing.md).
    secret: str
    created_at: datetime
