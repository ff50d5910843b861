from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from shared.errors import problem
from shared.events import Decision
from shared.wire import AwareInstant, DayOrInstant, JsonInt

OfflineDecisionInvalid = problem(
    422, "offline_decision_invalid", "offline_decision.decided_at is outside the accepted window"
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EntryIn(Strict):
    event_id: UUID
    plate: str = Field(max_length=32, examples=["苏E12345"])
    plate_color: str = Field(examples=["blue"])
    vehicle_type: Literal["small", "large"] = "small"
    occurred_at: AwareInstant = Field(examples=["2026-11-25T08:10:00+08:00"])
    lane: str = Field(default="", max_length=40, examples=["E1"])


OFFLINE_DECISION_EXAMPLE = {
    "decision": "postpay",
    "reason": "enrolled",
    "eligibility_version": 4182,
    "decided_at": "2026-11-25T10:45:00.412+08:00",
}


class OfflineDecisionIn(Strict):
    """What the gate answered on its own, from its eligibility snapshot, while the city was
    slow or away. Sent only with the replay of an exit decided that way."""

    decision: Decision = Field(examples=["postpay"])
    # The connector's own reason (`enrolled`, `not_eligible`, `offline_snapshot_stale`, ...).
    reason: str | None = Field(default=None, max_length=40, examples=["enrolled"])
    # `version` of the snapshot it decided from; null when it had none.
    eligibility_version: JsonInt | None = Field(default=None, ge=0, examples=[4182])
    decided_at: AwareInstant = Field(examples=["2026-11-25T10:45:00.412+08:00"])


class ExitIn(Strict):
    event_id: UUID
    plate: str = Field(max_length=32, examples=["苏E12345"])
    plate_color: str = Field(examples=["blue"])
    occurred_at: AwareInstant = Field(examples=["2026-11-25T10:45:00+08:00"])
    lane: str = Field(default="", max_length=40, examples=["X1"])
    offline_decision: OfflineDecisionIn | None = Field(
        default=None,
        description=(
            "Only on the replay of an exit the gate decided offline. An offline `postpay` is "
            "honoured when the city can back it: `decided_at` falls in an outage of the car "
            "park (after its last request the city received, not in the future), the city "
            "served it snapshot `eligibility_version` and the vehicle was eligible in it. "
            "Then, if the vehicle still belongs to a driver, the exit is recorded `postpay` "
            "with reason `offline_snapshot` even if the driver was suspended or lost the "
            "account meanwhile. Otherwise the exit is decided as the city decides it now and "
            "the claim is kept for the operator (`GET /v1/admin/unbacked-claims`). An offline "
            "`pay_on_site` or `free` is kept as it was (reason `offline_snapshot`): the driver "
            "paid at the gate and is not charged again. Online exits leave it out."
        ),
        examples=[OFFLINE_DECISION_EXAMPLE],
    )


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
    free_spaces: JsonInt = Field(ge=0)
    total_spaces: JsonInt = Field(ge=0)
    sdk_version: str = Field(max_length=40)


class HeartbeatOut(BaseModel):
    status: Literal["ok"] = "ok"


class PassWindow(Strict):
    start: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", examples=["21:00"])
    end: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", examples=["07:00"])


class PassIn(Strict):
    """A pass or whitelist entry (SPEC §10). Dates without a time are whole days on the lot's
    clock, `valid_to` included; `window` repeats daily inside the validity (nights only)."""

    plate: str = Field(max_length=32, examples=["苏E12345"])
    plate_color: str = Field(examples=["blue"])
    kind: Literal["monthly", "whitelist"]
    valid_from: DayOrInstant = Field(examples=["2026-11-01"])
    valid_to: DayOrInstant = Field(examples=["2026-11-30"])
    window: PassWindow | None = None


class PassOut(BaseModel):
    pass_id: str
    lot_id: str
    plate: str
    plate_color: str
    kind: Literal["monthly", "whitelist"]
    valid_from: datetime
    valid_to: datetime
    window: PassWindow | None
    time_zone: str
    updated_at: datetime
    status: Literal["created", "updated", "unchanged"]


class PassEntry(BaseModel):
    """A pass in the eligibility snapshot: the car park's own, its vehicle as
    sha256("<plate>:<plate_color>") (unlike `vehicles`, it tells the car park nothing new)."""

    pass_id: str
    vehicle: str
    kind: Literal["monthly", "whitelist"]
    valid_from: datetime
    valid_to: datetime
    window: PassWindow | None
    time_zone: str


class KdfOut(BaseModel):
    """How `vehicles` were hashed: hashlib.scrypt(b"<plate>:<plate_color>",
    salt=bytes.fromhex(salt), n=n, r=r, p=p, dklen=dklen).hex()."""

    name: Literal["scrypt"] = "scrypt"
    salt: str = Field(examples=["9f2c4e0b7a1d3f5e8c6b2a4d0e1f3a5b"])
    n: int = Field(examples=[16384])
    r: int = Field(examples=[8])
    p: int = Field(examples=[1])
    dklen: int = Field(examples=[32])


class EligibilityOut(BaseModel):
    version: int
    # 2: vehicles hashed per car park with `kdf` (1, unsalted sha256, is no longer served).
    format: Literal[2] = 2
    lot_postpay_enabled: bool = True
    hash: Literal["scrypt(plate:plate_color)"] = "scrypt(plate:plate_color)"
    # None for a lot without post-pay (its `vehicles` is empty).
    kdf: KdfOut | None = None
    # False while the city is still hashing newly eligible vehicles for this car park: they are
    # left out until it has (offline they pay on site).
    complete: bool = True
    vehicles: list[str]
    # The lot's live passes: a covered stay leaves `free` even while the city is away.
    passes: list[PassEntry] = Field(default_factory=list)
    passes_version: int = 0
