from __future__ import annotations

from typing import Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from shared.events import Decision


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EntryIn(Strict):
    event_id: UUID
    plate: str = Field(max_length=32, examples=["苏E12345"])
    plate_color: str = Field(examples=["blue"])
    vehicle_type: Literal["small", "large"] = "small"
    occurred_at: AwareDatetime = Field(examples=["2026-11-25T08:10:00+08:00"])
    lane: str = Field(default="", max_length=40, examples=["E1"])


class ExitIn(Strict):
    event_id: UUID
    plate: str = Field(max_length=32, examples=["苏E12345"])
    plate_color: str = Field(examples=["blue"])
    occurred_at: AwareDatetime = Field(examples=["2026-11-25T10:45:00+08:00"])
    lane: str = Field(default="", max_length=40, examples=["X1"])


class EntryOut(BaseModel):
    event_id: str
    status: Literal["accepted", "duplicate"]


class ExitOut(BaseModel):
    event_id: str
    decision: Decision
    reason: str
    session_id: str | None
    status: Literal["accepted", "duplicate"] = "accepted"


class BatchIn(Strict):
    events: list[dict[str, object]] = Field(min_length=1, max_length=500)


class BatchItemOut(BaseModel):
    index: int
    event_id: str | None
    status: Literal["accepted", "duplicate", "rejected"]
    decision: Decision | None = None
    reason: str | None = None
    session_id: str | None = None
    code: str | None = None
    detail: str | None = None


class BatchOut(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    results: list[BatchItemOut]


class HeartbeatIn(Strict):
    free_spaces: int = Field(ge=0)
    total_spaces: int = Field(ge=0)
    sdk_version: str = Field(max_length=40)


class HeartbeatOut(BaseModel):
    status: Literal["ok"] = "ok"


class EligibilityOut(BaseModel):
    version: int
    lot_postpay_enabled: bool = True
    hash: Literal["sha256(plate:plate_color)"] = "sha256(plate:plate_color)"
    vehicles: list[str]
