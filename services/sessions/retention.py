"""The sessions service's retention: a parking that ended more than
`retention_session_plates_days` ago keeps its plate only as a pseudonym and no driver link;
exits never paired with an entry (raw events) go after `retention_raw_events_days`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from services.sessions.models import ParkingSession, SessionStatus, UnmatchedExit
from services.sessions.rights import unlink
from shared import retention
from shared.retention import Step, count, days_ago, delete_batch
from shared.runtime import Runtime, Worker
from shared.settings import Settings


def _due(cutoff: datetime) -> list[ColumnElement[bool]]:
    return [
        ParkingSession.status != SessionStatus.open,
        ParkingSession.entered_at < cutoff,
        ParkingSession.pseudonymised_at.is_(None),
    ]


def _pseudonymise_batch(settings: Settings) -> retention.BatchFn:
    def batch(db: Session, cutoff: datetime, size: int) -> int:
        rows = list(db.scalars(select(ParkingSession).where(*_due(cutoff)).limit(size)))
        for s in rows:
            unlink(settings, s)
        db.flush()
        return len(rows)

    return batch


def steps(rt: Runtime) -> list[Step]:
    return [
        *retention.bus_steps(),  # the bus tables of this service's database
        Step(
            "session_plates",
            days_ago("retention_session_plates_days"),
            lambda db, c: count(db, select(ParkingSession.id).where(*_due(c))),
            _pseudonymise_batch(rt.settings),
        ),
        Step(
            "unmatched_exits",
            days_ago("retention_raw_events_days"),
            lambda db, c: count(
                db, select(UnmatchedExit.event_id).where(UnmatchedExit.received_at < c)
            ),
            lambda db, c, n: delete_batch(
                db, UnmatchedExit, UnmatchedExit.event_id, UnmatchedExit.received_at < c, size=n
            ),
        ),
    ]


def purge(rt: Runtime, *, dry_run: bool = False) -> dict[str, int]:
    return retention.run_steps(rt, steps(rt), dry_run=dry_run)


def worker(rt: Runtime) -> Worker:
    return retention.periodic(rt, "sessions", lambda: purge(rt))
