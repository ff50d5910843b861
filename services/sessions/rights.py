"""Drivers' rights in the sessions service: billing asks for a driver's parkings (export),
whether one is open (deletion waits for it), and to unlink them when the driver is erased."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.sessions import service
from services.sessions.models import ParkingSession, SessionStatus
from shared import pii
from shared.auth import InternalAuth
from shared.deps import DbSession
from shared.settings import Settings
from shared.timeutil import utcnow

internal = APIRouter(prefix="/internal/sessions/drivers", include_in_schema=False)

EXPORT_MAX = 100_000


class WindowIn(BaseModel):
    plate: str
    plate_color: str
    verified_at: datetime
    until: datetime | None


class ExportIn(BaseModel):
    windows: list[WindowIn]


def pseudonym(settings: Settings, s: ParkingSession) -> str:
    """The plate's keyed pseudonym: the same car stays one car in the statistics, but nobody
    can turn it back into a plate."""
    plate = pii.reveal(settings, s.plate)
    return plate if plate.startswith("v_") else pii.plate_ref(settings, plate, s.plate_color)


def unlink(settings: Settings, s: ParkingSession) -> None:
    """No driver link; a parking that is over also loses its plate (an open one keeps it until
    the exit is paired with it)."""
    s.driver_id = None
    if s.status != SessionStatus.open:
        s.plate = pseudonym(settings, s)
        s.pseudonymised_at = utcnow()


def erase_driver(db: Session, settings: Settings, driver_id: str) -> int:
    rows = list(db.scalars(select(ParkingSession).where(ParkingSession.driver_id == driver_id)))
    for s in rows:
        unlink(settings, s)
    db.flush()
    return len(rows)


@internal.post("/{driver_id}/export")
def export(driver_id: str, data: ExportIn, _: InternalAuth, db: DbSession) -> list[dict[str, Any]]:
    """The driver's parkings, as `/v1/me/sessions` shows them but all of them, plates in full
    (they are the driver's own)."""
    windows = [service.Window(w.plate, w.plate_color, w.verified_at, w.until) for w in data.windows]
    rows = service.SessionRepository.from_session(db).list_for_driver(
        driver_id, windows, None, None, EXPORT_MAX
    )
    return [
        {
            "id": s.id,
            "lot_id": s.lot_id,
            "lot_code": s.lot_code,
            "district": s.district,
            "plate": s.plate,
            "plate_color": s.plate_color,
            "vehicle_type": s.vehicle_type,
            "status": s.status,
            "entered_at": s.entered_at,
            "exited_at": s.exited_at,
            "decision": s.decision,
            "reason": s.reason,
        }
        for s in rows
    ]


@internal.get("/{driver_id}/open")
def open_count(driver_id: str, _: InternalAuth, db: DbSession) -> dict[str, int]:
    found = db.scalar(
        select(func.count())
        .select_from(ParkingSession)
        .where(ParkingSession.driver_id == driver_id, ParkingSession.status == SessionStatus.open)
    )
    return {"open": int(found or 0)}


@internal.post("/{driver_id}/erase")
def erase(driver_id: str, _: InternalAuth, db: DbSession, request: Request) -> dict[str, int]:
    """Unlink the erased driver's parkings (idempotent: once done, none is linked)."""
    return {"erased": erase_driver(db, request.app.state.settings, driver_id)}
