"""The connector's durable local outbox: every gate event is written here before it is sent.

One SQLite file in WAL mode with `synchronous=FULL`, so a committed event survives a process
crash and a power cut. Events leave in the order they were written (`seq`); the city
deduplicates on `event_id`, so sending one again after a crash is harmless.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = ["EventState", "Outbox", "OutboxEvent"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('entry', 'exit')),
    body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'delivered', 'rejected')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    delivered_at REAL,
    answer TEXT,
    offline_decision TEXT,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS events_by_state ON events (state, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class EventState(StrEnum):
    pending = "pending"  # written, not yet acknowledged by the city
    delivered = "delivered"  # the city answered 2xx (accepted or duplicate)
    rejected = "rejected"  # a permanent 4xx: kept with its problem for the operator


@dataclass(frozen=True)
class OutboxEvent:
    seq: int
    event_id: str
    kind: str
    body: dict[str, Any]
    state: EventState
    attempts: int
    created_at: float
    delivered_at: float | None
    answer: dict[str, Any] | None
    offline_decision: dict[str, Any] | None
    last_error: str | None


def _loads(value: str | None) -> dict[str, Any] | None:
    return None if value is None else json.loads(value)  # type: ignore[no-any-return]


class Outbox:
    """A thread-safe handle on one outbox file (`":memory:"` keeps events only in this process).

    Several processes may open the same file; SQLite serialises their writes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL syncs the WAL on every commit: with NORMAL a power cut may drop the last events.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add(self, event_id: str, kind: str, body: dict[str, Any]) -> tuple[int, bool]:
        """Store an event durably; `(seq, created)`. The same `event_id` again is not re-added."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO events (event_id, kind, body, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (event_id) DO NOTHING",
                (event_id, kind, json.dumps(body, ensure_ascii=False), time.time()),
            )
            if cur.rowcount:
                return int(cur.lastrowid or 0), True
            row = db.execute("SELECT seq FROM events WHERE event_id = ?", (event_id,)).fetchone()
            return int(row["seq"]), False

    def get(self, event_id: str) -> OutboxEvent | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM events WHERE event_id = ?", (event_id,)
            ).fetchone()
        return None if row is None else _event(row)

    def pending(self, limit: int, exclude: Sequence[str] = ()) -> list[OutboxEvent]:
        """The oldest pending events, in the order they were written."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE state = 'pending' ORDER BY seq LIMIT ?",
                (limit + len(exclude),),
            ).fetchall()
        skip = set(exclude)
        return [_event(r) for r in rows if r["event_id"] not in skip][:limit]

    def pending_before(self, seq: int, exclude: Sequence[str] = ()) -> bool:
        """Whether an older event still waits (then a new one must queue behind it)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT event_id FROM events WHERE state = 'pending' AND seq < ? "
                "ORDER BY seq LIMIT ?",
                (seq, len(exclude) + 1),
            ).fetchall()
        skip = set(exclude)
        return any(r["event_id"] not in skip for r in rows)

    def count(self, state: EventState) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT count(*) AS n FROM events WHERE state = ?", (state.value,)
            ).fetchone()
        return int(row["n"])

    def list(self, state: EventState | None = None, limit: int = 100) -> list[OutboxEvent]:
        """Newest first, for the operator's `citypark-connector outbox list`."""
        query = "SELECT * FROM events"
        args: tuple[Any, ...] = ()
        if state is not None:
            query += " WHERE state = ?"
            args = (state.value,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [_event(r) for r in rows]

    def mark_delivered(self, answers: Sequence[tuple[str, dict[str, Any]]]) -> None:
        with self._tx() as db:
            db.executemany(
                "UPDATE events SET state = 'delivered', delivered_at = ?, answer = ?, "
                "attempts = attempts + 1, last_error = NULL "
                "WHERE event_id = ? AND state = 'pending'",
                [(time.time(), json.dumps(a, ensure_ascii=False), eid) for eid, a in answers],
            )

    def mark_rejected(self, problems: Sequence[tuple[str, dict[str, Any]]]) -> None:
        with self._tx() as db:
            db.executemany(
                "UPDATE events SET state = 'rejected', answer = ?, attempts = attempts + 1, "
                "last_error = ? WHERE event_id = ? AND state = 'pending'",
                [
                    (json.dumps(p, ensure_ascii=False), str(p.get("code")), eid)
                    for eid, p in problems
                ],
            )

    def mark_failed(self, event_ids: Sequence[str], error: str) -> None:
        """A try that did not reach a verdict: the events stay pending."""
        with self._tx() as db:
            db.executemany(
                "UPDATE events SET attempts = attempts + 1, last_error = ? "
                "WHERE event_id = ? AND state = 'pending'",
                [(error[:500], eid) for eid in event_ids],
            )

    def set_offline_decision(self, event_id: str, decision: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE events SET offline_decision = ? WHERE event_id = ?",
                (json.dumps(decision), event_id),
            )

    def requeue(self, event_ids: Sequence[str]) -> int:
        """Send rejected events again (after the operator fixed what the problem named)."""
        with self._tx() as db:
            cur = db.executemany(
                "UPDATE events SET state = 'pending', answer = NULL "
                "WHERE event_id = ? AND state = 'rejected'",
                [(eid,) for eid in event_ids],
            )
            return cur.rowcount

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )


def _event(row: sqlite3.Row) -> OutboxEvent:
    return OutboxEvent(
        seq=int(row["seq"]),
        event_id=str(row["event_id"]),
        kind=str(row["kind"]),
        body=json.loads(row["body"]),
        state=EventState(row["state"]),
        attempts=int(row["attempts"]),
        created_at=float(row["created_at"]),
        delivered_at=row["delivered_at"],
        answer=_loads(row["answer"]),
        offline_decision=_loads(row["offline_decision"]),
        last_error=row["last_error"],
    )
