from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field


class ParkedKind(StrEnum):
    charge = "charge"
    refund = "refund"
    notification = "notification"


class ParkedItem(BaseModel):
    kind: ParkedKind
    id: str
    detail: str = Field(description="What failed, as recorded when it was parked")
    attempts: int
    since: datetime = Field(description="When it was last touched")


class ParkedOut(BaseModel):
    items: list[ParkedItem]
    due_backlog: dict[str, int] = Field(
        description="Money work due and not yet done, per queue (charges, refunds, deliveries)"
    )
