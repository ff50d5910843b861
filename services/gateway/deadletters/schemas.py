from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from shared.bus.deadletters import DeadLetterOut

ParkedKind = Literal["charge", "refund", "notification"]


class ParkedItem(BaseModel):
    kind: ParkedKind
    id: str
    detail: str
    attempts: int
    since: datetime


class DeadLettersOut(BaseModel):
    dead_letters: list[DeadLetterOut] = Field(
        description="Messages consumers set aside, oldest first (open ones unless asked)"
    )
    parked: list[ParkedItem] = Field(
        description="Charges, refunds and notifications parked after repeated unexpected errors"
    )
    due_backlog: dict[str, int] = Field(
        description="Money work due and not done yet, per queue: a growing figure is a stall"
    )

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "dead_letters": [
                        {
                            "id": 7,
                            "consumer": "citypark-billing",
                            "topic": "citypark.sessions-closed",
                            "event_id": "closed-3f2a",
                            "reason": "unexpected",
                            "error": "KeyError('lot_code')",
                            "at": "2026-11-30T08:00:00Z",
                            "replayed_at": None,
                            "payload": "{...}",
                        }
                    ],
                    "parked": [
                        {
                            "kind": "charge",
                            "id": "0b5e…",
                            "detail": "parked:KeyError",
                            "attempts": 0,
                            "since": "2026-11-30T08:01:00Z",
                        }
                    ],
                    "due_backlog": {"charges": 0, "refunds": 0, "deliveries": 0},
                }
            ]
        }
    }


class ReplayAllIn(BaseModel):
    consumer: str | None = Field(None, description="Only this consumer's dead letters")
    parked: bool = Field(
        True,
        strict=True,
        description="Also put every parked charge, refund and notification back",
    )


class ReplayAllOut(BaseModel):
    replayed: int
    skipped_undecodable: int
    parked_replayed: int
