"""What the gateway needs to rebuild its gate state: the sessions open right now."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import func, select

from services.sessions.models import ParkingSession, SessionStatus
from shared.auth import InternalAuth
from shared.deps import DbSession

internal = APIRouter(prefix="/internal/sessions/gate", include_in_schema=False)


class OpenSessionOut(BaseModel):
    session_id: str
    lot_id: str
    plate: str
    plate_color: str
    entered_at: datetime


class OpenSessionPage(BaseModel):
    items: list[OpenSessionOut]
    # The last session id of this page; pass it as `after` for the next one (null: the end).
    next: str | None
    # How many sessions are open in all; only on the first page (for progress).
    total: int | None = None


@internal.get("/open", response_model=OpenSessionPage)
def open_sessions(
    _: InternalAuth,
    db: DbSession,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> OpenSessionPage:
    """Open sessions in id order: the vehicle, its car park and when it entered."""
    is_open = ParkingSession.status == SessionStatus.open
    where = [is_open] if after is None else [is_open, ParkingSession.id > after]
    rows = db.execute(
        select(
            ParkingSession.id,
            ParkingSession.lot_id,
            ParkingSession.plate,
            ParkingSession.plate_color,
            ParkingSession.entered_at,
        )
        .where(*where)
        .order_by(ParkingSession.id)
        .limit(limit)
    ).all()
    items = [
        OpenSessionOut(
            session_id=r.id,
            lot_id=r.lot_id,
            plate=r.plate,
            plate_color=r.plate_color,
            entered_at=r.entered_at,
        )
        for r in rows
    ]
    total = (
        db.scalar(select(func.count()).select_from(ParkingSession).where(is_open))
        if after is None
        else None
    )
    return OpenSessionPage(
        items=items, next=items[-1].session_id if len(items) == limit else None, total=total
    )
