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


# Many waiters on one name (every consumer of the embedded log): a generation counter under
# a condition, so that no waiter misses a commit another waiter already saw.
_generations: dict[str, int] = {}
_changed = threading.Condition()


def generation(name: str) -> int:
    with _changed:
        return _generations.get(name, 0)


def wait_past(name: str, seen: int, timeout_s: float) -> bool:
    """Wait until a commit for `name` after generation `seen`, at most `timeout_s`."""
    with _changed:
        return _changed.wait_for(lambda: _generations.get(name, 0) != seen, timeout_s)


@event.listens_for(Session, "after_commit")
def _wake(db: Session) -> None:
    names = db.info.pop(_PENDING, ())
    if not names:
        return
    for name in names:
        wakeup(name).set()
    with _changed:
        for name in names:
            _generations[name] = _generations.get(name, 0) + 1
        _changed.notify_all()


@event.listens_for(Session, "after_rollback")
def _forget(db: Session) -> None:
    db.info.pop(_PENDING, None)
