"""Pairing entries and exits into sessions. Handles duplicates and reordering; never commits."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import and_, false, func, or_, select, tuple_
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from services.sessions.models import ParkingSession, SessionStatus, UnmatchedExit
from shared.bus.outbox import enqueue
from shared.errors import CursorInvalid, NotFound
from shared.events import (
    Decision,
    EventType,
    ParkingEvent,
    SessionClosed,
    new_event,
    session_id_for,
)
from shared.pii_columns import index_in
from shared.settings import Settings
from shared.topics import SESSIONS_CLOSED

log = structlog.get_logger(__name__)
SOURCE = "sessions"


@dataclass(frozen=True)
class Window:
    """A plate the driver held verified from `since` until `until` (None: still holds it)."""

    plate: str
    plate_color: str
    since: datetime
    until: datetime | None

    def covers(self, s: ParkingSession) -> bool:
        return (
            (s.plate, s.plate_color) == (self.plate, self.plate_color)
            and self.since <= s.entered_at
            and (self.until is None or s.entered_at < self.until)
        )


def _in_windows(windows: Sequence[Window], db: Session) -> ColumnElement[bool]:
    """Parkings that entered while the driver held the vehicle verified: never one from
    before the proof (a claim reveals no past whereabouts) nor after a takeover."""
    if not windows:
        return false()
    return or_(
        *(
            and_(
                ParkingSession.plate_bidx == index_in(db, "plate", w.plate),
                ParkingSession.plate_color == w.plate_color,
                ParkingSession.entered_at >= w.since,
                *([ParkingSession.entered_at < w.until] if w.until is not None else []),
            )
            for w in windows
        )
    )


class SessionRepository:
    def __init__(self, db: Session) -> None:
        self.db = db

    @classmethod
    def from_session(cls, db: Session) -> SessionRepository:
        return cls(db)

    def get_open_by_vehicle(self, lot_id: str, plate: str, color: str) -> ParkingSession | None:
        return self.db.scalar(
            select(ParkingSession)
            .where(
                ParkingSession.lot_id == lot_id,
                ParkingSession.plate_bidx == index_in(self.db, "plate", plate),
                ParkingSession.plate_color == color,
                ParkingSession.status == SessionStatus.open,
            )
            .order_by(ParkingSession.entered_at.desc())
            .limit(1)
        )

    def get_by_entry(self, event_id: str) -> ParkingSession | None:
        return self.db.scalar(
            select(ParkingSession).where(ParkingSession.entry_event_id == event_id)
        )

    def get_by_exit(self, event_id: str) -> ParkingSession | None:
        return self.db.scalar(
            select(ParkingSession).where(ParkingSession.exit_event_id == event_id)
        )

    def first_unmatched_exit_after(
        self, lot_id: str, plate: str, color: str, after: datetime
    ) -> UnmatchedExit | None:
        return self.db.scalar(
            select(UnmatchedExit)
            .where(
                UnmatchedExit.lot_id == lot_id,
                UnmatchedExit.plate_bidx == index_in(self.db, "plate", plate),
                UnmatchedExit.plate_color == color,
                UnmatchedExit.occurred_at >= after,
            )
            .order_by(UnmatchedExit.occurred_at)
            .limit(1)
        )

    def list_for_driver(
        self,
        driver_id: str,
        windows: Sequence[Window],
        status: SessionStatus | None,
        cursor: tuple[datetime, str] | None,
        limit: int,
    ) -> list[ParkingSession]:
        if not windows:
            return []
        q = select(ParkingSession).where(
            ParkingSession.driver_id == driver_id, _in_windows(windows, self.db)
        )
        if status is not None:
            q = q.where(ParkingSession.status == status)
        if cursor is not None:
            q = q.where(tuple_(ParkingSession.entered_at, ParkingSession.id) < cursor)
        q = q.order_by(ParkingSession.entered_at.desc(), ParkingSession.id.desc()).limit(limit)
        return list(self.db.scalars(q))

    def search(
        self, *, plate: str | None, lot_id: str | None, status: SessionStatus | None, limit: int
    ) -> Sequence[ParkingSession]:
        q = select(ParkingSession)
        if plate:
            q = q.where(ParkingSession.plate_bidx == index_in(self.db, "plate", plate))
        if lot_id:
            q = q.where(ParkingSession.lot_id == lot_id)
        if status:
            q = q.where(ParkingSession.status == status)
        return self.db.scalars(q.order_by(ParkingSession.entered_at.desc()).limit(limit)).all()


def handle_parking_event(
    db: Session, event_type: str, data: ParkingEvent, settings: Settings
) -> None:
    """`settings` hold the data keys: the closing event carries the plate sealed."""
    repo = SessionRepository.from_session(db)
    if event_type == EventType.parking_entry:
        _on_entry(db, repo, data, settings)
    elif event_type == EventType.parking_exit:
        _on_exit(db, repo, data, settings)
    else:
        raise ValueError(f"unexpected event type {event_type}")


def _on_entry(db: Session, repo: SessionRepository, e: ParkingEvent, settings: Settings) -> None:
    if repo.get_by_entry(f"{e.lot_id}/{e.event_id}") is not None:
        return
    current = repo.get_open_by_vehicle(e.lot_id, e.plate, e.plate_color)
    if current is not None:
        if current.entered_at >= e.occurred_at:
            # A late, older entry of a vehicle already inside: the newer entry stands.
            log.info("sessions.entry_stale", lot=e.lot_code, event_id=e.event_id)
            return
        current.status = SessionStatus.abandoned
        log.warning("sessions.abandoned", session_id=current.id, lot=e.lot_code)
    session = ParkingSession(
        id=session_id_for(e.lot_id, e.event_id),
        lot_id=e.lot_id,
        lot_code=e.lot_code,
        district=e.district,
        operator_id=e.operator_id,
        plate=e.plate,
        plate_color=e.plate_color,
        vehicle_type=e.vehicle_type,
        driver_id=e.driver_id,
        entry_event_id=f"{e.lot_id}/{e.event_id}",
        entered_at=e.occurred_at,
        entry_lane=e.lane,
    )
    db.add(session)
    db.flush()
    log.info("sessions.opened", session_id=session.id, lot=e.lot_code, entered_at=e.occurred_at)
    early_exit = repo.first_unmatched_exit_after(e.lot_id, e.plate, e.plate_color, e.occurred_at)
    if early_exit is not None:
        # Kept sealed since plates were sealed; older rows hold the plate in clear.
        exit_event = ParkingEvent.model_validate_json(early_exit.payload).sealed(settings)
        db.delete(early_exit)
        _close(db, session, exit_event, settings)


def _on_exit(db: Session, repo: SessionRepository, e: ParkingEvent, settings: Settings) -> None:
    if repo.get_by_exit(f"{e.lot_id}/{e.event_id}") is not None:
        return
    session = repo.get_open_by_vehicle(e.lot_id, e.plate, e.plate_color)
    if session is None or session.entered_at > e.occurred_at:
        if db.get(UnmatchedExit, f"{e.lot_id}/{e.event_id}") is None:
            db.add(
                UnmatchedExit(
                    event_id=f"{e.lot_id}/{e.event_id}",
                    lot_id=e.lot_id,
                    plate=e.plate,
                    plate_color=e.plate_color,
                    occurred_at=e.occurred_at,
                    payload=e.sealed(settings).model_dump_json(),
                )
            )
        log.info("sessions.exit_unmatched", lot=e.lot_code, event_id=e.event_id)
        return
    _close(db, session, e, settings)


def _close(db: Session, session: ParkingSession, e: ParkingEvent, settings: Settings) -> None:
    session.status = SessionStatus.closed
    session.exited_at = e.occurred_at
    session.exit_event_id = f"{e.lot_id}/{e.event_id}"
    session.exit_lane = e.lane
    session.decision = (e.decision or Decision.pay_on_site).value
    session.reason = e.reason
    session.driver_id = e.driver_id or session.driver_id
    db.flush()
    closed = SessionClosed(
        session_id=session.id,
        lot_id=session.lot_id,
        lot_code=session.lot_code,
        district=session.district,
        operator_id=session.operator_id,
        plate=session.plate,
        plate_color=session.plate_color,
        vehicle_type=session.vehicle_type,
        entered_at=session.entered_at,
        exited_at=e.occurred_at,
        decision=Decision(session.decision),
        reason=session.reason,
        driver_id=session.driver_id,
    ).sealed(settings)
    # The session id as event id: however often the exit arrives, one closing event exists.
    event = new_event(
        EventType.session_closed,
        source=SOURCE,
        data=closed,
        subject=session.id,
        id_=f"session-closed-{session.id}",
    )
    enqueue(
        db,
        source=SOURCE,
        topic=SESSIONS_CLOSED,
        key=session.driver_id or f"vehicle:{closed.plate_ref}",
        event=event,
    )
    log.info(
        "sessions.closed", session_id=session.id, lot=session.lot_code, decision=session.decision
    )


def get_for_driver(
    db: Session, driver_id: str, windows: Sequence[Window], session_id: str
) -> ParkingSession:
    session = db.get(ParkingSession, session_id)
    # Another driver's session, or one outside their proven ownership, is indistinguishable
    # from a missing one.
    if (
        session is None
        or session.driver_id != driver_id
        or not any(w.covers(session) for w in windows)
    ):
        raise NotFound("No such session")
    return session


def encode_cursor(session: ParkingSession) -> str:
    raw = f"{session.entered_at.isoformat()}|{session.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, sid = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(at), sid
    except (ValueError, UnicodeDecodeError) as exc:
        raise CursorInvalid("cursor is not valid; use a `next_cursor` as given") from exc


def stats(db: Session, since: datetime) -> dict[str, int]:
    def count(*where: object) -> int:
        q = select(func.count()).select_from(ParkingSession).where(*where)  # type: ignore[arg-type]
        return int(db.scalar(q) or 0)

    return {
        "parkings_served": count(ParkingSession.status == SessionStatus.closed),
        "open_now": count(ParkingSession.status == SessionStatus.open),
        "parkings_since": count(
            ParkingSession.status == SessionStatus.closed, ParkingSession.exited_at >= since
        ),
        "postpay_parkings": count(ParkingSession.decision == "postpay"),
    }
