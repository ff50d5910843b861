from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from services.sessions import service
from services.sessions.models import ParkingSession, SessionStatus
from services.sessions.schemas import AdminSessionOut, SessionOut, SessionPage
from shared.auth import DriverAuth, InternalAuth
from shared.deps import DbSession
from shared.errors import CursorInvalid, NotFound, PlateInvalid, UpstreamUnavailable
from shared.http import problem_responses
from shared.internal import InternalClient
from shared.masking import UNMASK_RESPONSES, View, staff_view
from shared.plates import normalize_plate
from shared.timeutil import utcnow

driver = APIRouter(prefix="/v1/me", tags=["driver: parkings"])
admin = APIRouter(prefix="/v1/admin", tags=["admin: parkings"])
internal = APIRouter(prefix="/internal/sessions", include_in_schema=False)


def _fee_so_far(request: Request, s: ParkingSession) -> int | None:
    lots: InternalClient = request.app.state.runtime.internal("lots")
    try:
        answer = lots.call(
            "POST",
            f"/internal/lots/{s.lot_id}/price",
            json={
                "lot_id": s.lot_id,
                "entered_at": s.entered_at.isoformat(),
                "exited_at": utcnow().isoformat(),
                "vehicle_type": s.vehicle_type,
                "plate_color": s.plate_color,
                "plate": s.plate,
            },
        )
    except Exception:
        # The live fee is a courtesy; the session itself must still show.
        return None
    return int(answer["fee_fen"])


def _windows(request: Request, driver_id: str) -> list[service.Window]:
    """When the driver held which plate verified (billing knows; asked on every read, so a
    takeover or a removal shows at once)."""
    billing: InternalClient = request.app.state.runtime.internal("billing")
    found = billing.call("GET", f"/internal/billing/drivers/{driver_id}/verified-windows")
    return [
        service.Window(
            plate=w["plate"],
            plate_color=w["plate_color"],
            since=datetime.fromisoformat(w["verified_at"]),
            until=datetime.fromisoformat(w["until"]) if w["until"] else None,
        )
        for w in found
    ]


@driver.get(
    "/sessions",
    response_model=SessionPage,
    responses=problem_responses(CursorInvalid, UpstreamUnavailable),
)
def list_sessions(
    me: DriverAuth,
    db: DbSession,
    request: Request,
    status: SessionStatus | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> SessionPage:
    """The driver's parkings, newest first; `next_cursor` pages on. Only parkings that began
    while the driver held the vehicle verified show: none of an unverified plate, none from
    before the proof, none after another driver took the plate over."""
    after = service.decode_cursor(cursor) if cursor else None
    rows = service.SessionRepository.from_session(db).list_for_driver(
        me.id, _windows(request, me.id), status, after, limit + 1
    )
    page = rows[:limit]
    nxt = service.encode_cursor(page[-1]) if len(rows) > limit else None
    return SessionPage(items=[SessionOut.of(s) for s in page], next_cursor=nxt)


@driver.get(
    "/sessions/{session_id}",
    response_model=SessionOut,
    responses=problem_responses(NotFound, UpstreamUnavailable),
)
def get_session(session_id: str, me: DriverAuth, db: DbSession, request: Request) -> SessionOut:
    """One parking; while it is open it shows the fee so far."""
    s = service.get_for_driver(db, me.id, _windows(request, me.id), session_id)
    fee = _fee_so_far(request, s) if s.status == SessionStatus.open else None
    return SessionOut.of(s, fee)


@admin.get(
    "/sessions",
    response_model=list[AdminSessionOut],
    responses={**problem_responses(PlateInvalid), **UNMASK_RESPONSES},
)
def search_sessions(
    view: Annotated[View, Depends(staff_view("sessions", "session"))],
    db: DbSession,
    plate: str | None = None,
    lot_id: str | None = None,
    status: SessionStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[AdminSessionOut]:
    """Parkings, newest first, by plate, car park or status. Plates are masked unless an admin
    asks `unmasked=true` with a `reason` (audited); searching by plate is such a look-up."""
    if plate:
        view.require_lookup("plate")
    rows = service.SessionRepository.from_session(db).search(
        plate=normalize_plate(plate) if plate else None, lot_id=lot_id, status=status, limit=limit
    )
    out = [AdminSessionOut.model_validate(s, from_attributes=True) for s in rows]
    for item in out:
        item.plate = view.plate(item.plate)
    return out


@internal.get("/open", response_model=AdminSessionOut, responses=problem_responses(NotFound))
def open_session(
    _: InternalAuth, db: DbSession, lot_id: str, plate: str, plate_color: str
) -> AdminSessionOut:
    """The vehicle's open session at a car park (billing checks merchants' validations with it).
    `plate` and `plate_color` are the canonical forms."""
    s = service.SessionRepository.from_session(db).get_open_by_vehicle(lot_id, plate, plate_color)
    if s is None:
        raise NotFound("No open session of this vehicle at this car park")
    return AdminSessionOut.model_validate(s, from_attributes=True)


@internal.get("/stats")
def stats(_: InternalAuth, db: DbSession, since: datetime) -> dict[str, int]:
    return service.stats(db, since)
