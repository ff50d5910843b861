"""Retention: each service purges what it owns once its period is over (docs/privacy.md).

A purge is a list of steps; a step works in batches of at most `retention_batch_size` rows,
each batch in its own short transaction (on SQLite a writer holds the one write lock: no long
transaction, no network inside one). Steps pick their rows by a condition the batch itself
makes false (deleted, or marked done), so a purge is idempotent and replicas running it at
once only share the work: a row two of them pick is changed once, the other finds it gone.

`worker` runs a service's purge every `retention_interval_s` and logs one line per run with
the counts; `citypark privacy purge [--dry-run]` runs them all once.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import ColumnElement, Select, delete, func, select
from sqlalchemy.orm import Session

from shared.bus.models import DeadLetter, InboxRow, LogOffset, LogRow
from shared.runtime import Runtime, Worker
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)

# A batch step: given a session, the cut-off and the batch size, changes at most that many rows
# and says how many it changed (0: nothing left).
BatchFn = Callable[[Session, datetime, int], int]
CountFn = Callable[[Session, datetime], int]


@dataclass(frozen=True)
class Step:
    name: str
    cutoff: Callable[[Runtime], datetime]
    count: CountFn  # what is due (for --dry-run and the log line)
    batch: BatchFn


def days_ago(attr: str) -> Callable[[Runtime], datetime]:
    return lambda rt: utcnow() - timedelta(days=getattr(rt.settings, attr))


def run_steps(rt: Runtime, steps: list[Step], *, dry_run: bool = False) -> dict[str, int]:
    """Each step's count of rows purged (or due, with `dry_run`)."""
    counts: dict[str, int] = {}
    size = rt.settings.retention_batch_size
    for step in steps:
        cutoff = step.cutoff(rt)
        if dry_run:
            with rt.read_sessionmaker() as db, db.begin():
                counts[step.name] = step.count(db, cutoff)
            continue
        total = 0
        while True:
            with rt.sessionmaker() as db, db.begin():
                done = step.batch(db, cutoff, size)
            total += done
            if done < size:
                break
        counts[step.name] = total
    return counts


def delete_batch(db: Session, model: Any, key: Any, *where: Any, size: int) -> int:
    """Delete up to `size` rows of `model` matching `where`, chosen by primary `key`."""
    ids = list(db.scalars(select(key).where(*where).limit(size)))
    if not ids:
        return 0
    db.execute(delete(model).where(key.in_(ids)).execution_options(synchronize_session=False))
    return len(ids)


def count(db: Session, query: Select[Any]) -> int:
    return int(db.scalar(select(func.count()).select_from(query.subquery())) or 0)


def periodic(rt: Runtime, service: str, purge: Callable[[], dict[str, int]]) -> Worker:
    """Runs the service's purge every `retention_interval_s`, the first run within one interval
    of start (spread so that replicas started together do not all purge at once)."""

    def run(stop: threading.Event) -> None:
        interval = rt.settings.retention_interval_s
        wait = random.uniform(min(60.0, interval), interval)  # spreads replicas; not a secret
        while not stop.wait(wait):
            try:
                counts = purge()
            except Exception as exc:  # next run tries again; the purge is idempotent
                log.warning("retention.failed", service=service, error=repr(exc)[:300])
            else:
                log.info("retention.purged", service=service, **counts)
            wait = interval

    return run


# --- the bus's own tables (raw events, inbox marks, dead letters) -----------------------------


def _delivered_log(cutoff: datetime, below: int | None) -> list[Any]:
    """Log rows past the period that every consumer has read (embedded log) or the relay has
    published (outbox before Kafka)."""
    done: ColumnElement[bool] = LogRow.relayed_at.is_not(None)
    if below is not None:
        done = done | (LogRow.id <= below)
    return [LogRow.created_at < cutoff, done]


def _lowest_position(db: Session) -> int | None:
    return db.scalar(select(func.min(LogOffset.position)))


def bus_steps() -> list[Step]:
    cutoff = days_ago("retention_raw_events_days")
    return [
        Step(
            "bus_events",
            cutoff,
            lambda db, c: count(
                db, select(LogRow.id).where(*_delivered_log(c, _lowest_position(db)))
            ),
            lambda db, c, n: delete_batch(
                db, LogRow, LogRow.id, *_delivered_log(c, _lowest_position(db)), size=n
            ),
        ),
        Step(
            "bus_inbox",
            cutoff,
            lambda db, c: count(db, select(InboxRow.event_id).where(InboxRow.seen_at < c)),
            lambda db, c, n: _delete_inbox(db, c, n),
        ),
        Step(
            "dead_letters",
            cutoff,
            lambda db, c: count(db, select(DeadLetter.id).where(DeadLetter.at < c)),
            lambda db, c, n: delete_batch(db, DeadLetter, DeadLetter.id, DeadLetter.at < c, size=n),
        ),
    ]


def _delete_inbox(db: Session, cutoff: datetime, size: int) -> int:
    keys = list(
        db.execute(
            select(InboxRow.consumer, InboxRow.event_id)
            .where(InboxRow.seen_at < cutoff)
            .limit(size)
        )
    )
    for consumer, event_id in keys:
        db.execute(
            delete(InboxRow).where(InboxRow.consumer == consumer, InboxRow.event_id == event_id)
        )
    return len(keys)
