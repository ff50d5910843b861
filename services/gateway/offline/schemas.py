from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from shared.events import Decision


class OfflineClaimOut(BaseModel):
    """An offline gate decision the city did not take as stated."""

    lot_id: str
    lot_code: str
    event_id: str
    plate: str = Field(description="Masked, like every plate shown to staff")
    plate_color: str
    claimed_decision: Decision = Field(description="What the gate decided offline")
    eligibility_version: int | None
    decided_at: datetime
    reason: str = Field(
        description="`snapshot_unknown`, `snapshot_superseded`, `not_eligible_in_snapshot` or "
        "`outside_outage` (an offline `postpay` the city could not back), or "
        "`city_would_postpay` (the gate took payment, or let the car go, where the city would "
        "have let it out on post-pay)",
        examples=["not_eligible_in_snapshot"],
    )
    decision: Decision = Field(description="What the city recorded for the exit")
    driver_id: str | None
    recorded_at: datetime
