"""One failure policy for every consumer and every queue of due rows.

Every error a worker meets falls into one of three kinds, and each kind has one answer:

* **transient** — a neighbour or the database is away for a moment (connection and operational
  database errors, upstream unavailable or busy, timeouts, Redis or Kafka down): retried with
  capped backoff, for as long as it takes, never skipped and never dead-lettered;
* **bad data** — the message or row can never succeed as it is (it does not validate, or a
  service refused it as a client error): dead-lettered at once with its reason;
* **unexpected** — anything else, i.e. a bug: retried a few times (it may be a race), then that
  one message or row is *parked* — set aside, visible to ops, counted and logged as an error —
  and the others carry on behind it. A parked item is replayed by ops once the cause is fixed.

Queues of due rows (charges, refunds, deliveries) share `claim_due`: a short transaction marks
a batch as taken by moving `next_attempt_at` a lease into the future, the slow part (the
provider, a webhook) runs with no transaction open, and the answer is recorded in a second
short transaction that reads the row afresh. A worker killed in between loses nothing: the
lease runs out and the row is due again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import httpx
import redis.exceptions
import structlog
from prometheus_client import Counter
from pydantic import ValidationError
from sqlalchemy import ColumnElement, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from shared.errors import Problem, UpstreamRejected, UpstreamUnavailable
from shared.pii import DataKeyUnknown
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)

# How often an unexpected error may repeat on one item before that item is parked.
PARK_AFTER = 5

RETRIES = Counter(
    "citypark_work_retries_total", "Transient failures retried, by worker and kind", ["worker"]
)
DEAD_LETTERS = Counter(
    "citypark_dead_letters_total",
    "Messages set aside for ops, by consumer and reason",
    ["consumer", "reason"],
)
PARKED = Counter("citypark_work_parked_total", "Rows parked after repeated errors", ["queue"])


class Failure(StrEnum):
    transient = "transient"
    bad_data = "bad_data"
    unexpected = "unexpected"


def _kafka_errors() -> tuple[type[BaseException], ...]:
    try:
        from kafka.errors import KafkaError
    except ImportError:  # pragma: no cover - kafka-python is a dependency
        return ()
    return (KafkaError,)


TRANSIENT: tuple[type[BaseException], ...] = (
    OperationalError,
    PoolTimeout,
    UpstreamUnavailable,
    httpx.TransportError,
    TimeoutError,
    ConnectionError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    *_kafka_errors(),
)


def classify(exc: BaseException) -> Failure:
    """Which kind of failure `exc` is (the module docstring says what each kind gets)."""
    if isinstance(exc, UpstreamRejected):
        return Failure.unexpected  # our request is wrong: a bug to fix, then replay
    if isinstance(exc, DataKeyUnknown):
        # Sealed under a data key this process lacks: retrying cannot help; kept as a dead
        # letter and replayed once the key is configured.
        return Failure.bad_data
    if isinstance(exc, TRANSIENT):
        return Failure.transient
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return Failure.transient
    if isinstance(exc, Problem):
        if exc.status >= 500 or exc.status in (408, 425, 429):
            return Failure.transient
        if exc.status in (404, 409):
            # Not there yet, or racing someone: may settle by itself, so not poison at once.
            return Failure.unexpected
        return Failure.bad_data
    if isinstance(exc, ValidationError | ValueError | UnicodeDecodeError):
        return Failure.bad_data
    return Failure.unexpected


def backoff_s(attempt: int, *, base: float = 0.2, cap: float = 10.0) -> float:
    """Capped exponential backoff: base, 2·base, 4·base … never more than `cap`."""
    return float(min(cap, base * 2 ** max(0, min(attempt, 30))))


class Strikes:
    """How many unexpected errors each item has met in a row (bounded; in memory, so a
    restart gives a parked-to-be item a few more tries, never fewer)."""

    def __init__(self, limit: int = PARK_AFTER, size: int = 10_000) -> None:
        self.limit = limit
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def hit(self, key: str) -> bool:
        """Count one more strike; True when the item has had enough and is to be parked."""
        with self._lock:
            n = self._counts.pop(key, 0) + 1
            if n >= self.limit:
                return True
            self._counts[key] = n
            while len(self._counts) > self._size:
                self._counts.popitem(last=False)
            return False

    def clear(self, key: str) -> None:
        with self._lock:
            self._counts.pop(key, None)


def claim_due(
    db: Session,
    id_column: InstrumentedAttribute[Any],
    due_at: InstrumentedAttribute[datetime],
    where: ColumnElement[bool],
    *,
    limit: int,
    lease: timedelta,
) -> list[Any]:
    """Take up to `limit` due rows for `lease`: their `due_at` moves to now + lease, so no
    other worker (thread or replica) takes them meanwhile, and a worker that dies with them
    hands them back when the lease runs out. Earliest due first.

    PostgreSQL skips rows another worker holds (`SKIP LOCKED`); SQLite's writer transaction
    holds the one write lock, so two claims never overlap there either."""
    now = utcnow()
    query = select(id_column).where(where, due_at <= now).order_by(due_at, id_column).limit(limit)
    if db.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    ids = list(db.scalars(query))
    if ids:
        model = id_column.class_
        for row in db.scalars(select(model).where(id_column.in_(ids))):
            setattr(row, due_at.key, now + lease)
    return ids


def locked(db: Session, model: type[Any], key: Any) -> Any:
    """The row `key` of `model`, read afresh and held until the transaction ends (on SQLite
    the writer transaction already holds the write lock)."""
    query = select(model).where(model.id == key).execution_options(populate_existing=True)
    if db.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return db.scalar(query)


def settle_failure(
    factory: sessionmaker[Session],
    model: type[Any],
    key: str,
    exc: Exception,
    *,
    queue: str,
    strikes: Strikes,
    is_open: Callable[[Any], bool],
    park: Callable[[Any, Exception], None],
) -> None:
    """The failure policy for one row of a queue whose step raised: a transient error backs
    the row off; a bug backs it off too until it has had `PARK_AFTER` strikes, and then `park`
    sets it aside. Either way the rows behind it go on. A row no longer open (settled
    meanwhile) is left alone; if the database itself is away, the lease hands the row back."""
    kind = classify(exc)
    parking = kind is not Failure.transient and strikes.hit(key)
    try:
        with factory() as db, db.begin():
            row = locked(db, model, key)
            if row is None or not is_open(row):
                return
            if parking:
                park(row, exc)
            else:
                row.next_attempt_at = utcnow() + timedelta(
                    seconds=backoff_s(row.attempts, base=1.0, cap=30.0)
                )
    except Exception as again:
        log.warning("work.failure_unrecorded", queue=queue, id=key, error=repr(again))
        return
    if parking:
        PARKED.labels(queue).inc()
        log.error("work.parked", queue=queue, id=key, error=repr(exc))
    elif kind is Failure.transient:
        RETRIES.labels(queue).inc()
        log.warning("work.retry", queue=queue, id=key, error=repr(exc))
    else:
        log.error("work.failed", queue=queue, id=key, error=repr(exc), strike=True)


def run_due(
    factory: sessionmaker[Session],
    model: type[Any],
    is_due: ColumnElement[bool],
    step: Callable[[str], None],
    *,
    queue: str,
    strikes: Strikes,
    is_open: Callable[[Any], bool],
    park: Callable[[Any, Exception], None],
    lease: timedelta,
    limit: int,
) -> int:
    """One round of a queue: claim up to `limit` due rows for `lease` in one short
    transaction, then `step` each (with no transaction of ours open); a step that raises goes
    through `settle_failure` and never holds up the rows behind it. Returns how many were
    taken."""
    with factory() as db, db.begin():
        claimed = claim_due(db, model.id, model.next_attempt_at, is_due, limit=limit, lease=lease)
    for key in claimed:
        try:
            step(key)
            strikes.clear(key)
        except Exception as exc:
            settle_failure(
                factory,
                model,
                key,
                exc,
                queue=queue,
                strikes=strikes,
                is_open=is_open,
                park=park,
            )
    return len(claimed)
