"""In-process wake-ups after commit: a worker sleeps until a transaction of its own process
commits work for it, instead of polling its table every few milliseconds.

Polling stays as a slow safety net (rows written by another replica, or left by a crash),
so a missed wake-up only delays work, never loses it.
"""

from __future__ import annotations

import threading

from sqlalchemy import event
from sqlalchemy.orm import Session

_events: dict[str, threading.Event] = {}
_lock = threading.Lock()
_PENDING = "citypark.wakeups"


def wakeup(name: str) -> threading.Event:
    """The event a worker for `name` waits on (one per name and process)."""
    with _lock:
        return _events.setdefault(name, threading.Event())


def after_commit(db: Session, name: str) -> None:
    """Wake the workers for `name` once this session's transaction commits (not on rollback)."""
    db.info.setdefault(_PENDING, set()).add(name)


@event.listens_for(Session, "after_commit")
def _wake(db: Session) -> None:
    for name in db.info.pop(_PENDING, ()):
        wakeup(name).set()


@event.listens_for(Session, "after_rollback")
def _forget(db: Session) -> None:
    db.info.pop(_PENDING, None)
