from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from shared.plates import mask_plate


class SessionOut(BaseModel):
    id: str
    lot_id: str
    lot_code: str
    district: str
    plate: str
    plate_color: str
    vehicle_type: str
    status: str
    entered_at: datetime
    exited_at: datetime | None
    decision: str | None
    reason: str | None
    fee_so_far_fen: int | None = None

    @classmethod
    def of(cls, s: object, fee_so_far_fen: int | None = None) -> SessionOut:
        out = cls.model_validate(s, from_attributes=True)
        out.plate = mask_plate(out.plate)
        out.fee_so_far_fen = fee_so_far_fen
        return out


class SessionPage(BaseModel):
    items: list[SessionOut]
    next_cursor: str | None


class AdminSessionOut(SessionOut):
    driver_id: str | None
    operator_id: str
