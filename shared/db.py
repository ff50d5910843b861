"""Database engines and sessions for PostgreSQL (real topology) and SQLite (embedded default)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Engine,
    MetaData,
    String,
    TypeDecorator,
    create_engine,
    event,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from shared.timeutil import as_utc

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are stored in UTC and always come back timezone-aware, on both backends."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else as_utc(value)


JSONDoc = JSON().with_variant(postgresql.JSONB(), "postgresql")


def new_id() -> str:
    return str(uuid.uuid4())


def id_column_type() -> String:
    return String(36)


def make_base(schema_prefix: str) -> type[DeclarativeBase]:
    """Each service owns its tables (prefixed by the service) and migrates them itself."""

    class Base(DeclarativeBase):
        metadata = MetaData(naming_convention=NAMING)
        type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONDoc}

    Base.__doc__ = f"Declarative base of the `{schema_prefix}` service."
    return Base


# Execution options a session can carry onto its connection (SQLite only; PostgreSQL ignores
# them): a transaction that only reads, and how long a writer may wait for the write lock.
READ_ONLY = "citypark_read_only"
BUSY_TIMEOUT_MS = "citypark_busy_timeout_ms"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    if url.startswith("sqlite"):
        # One process runs the whole city here: the API's threads plus a worker thread per
        # consumer each hold a connection, so the pool is sized for that, not the default 5.
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=40,
            max_overflow=40,
        )
        _real_sqlite_transactions(engine)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=20, pool_pre_ping=True)


def _real_sqlite_transactions(engine: Engine) -> None:
    """Give SQLite the transactions the code is written for (SQLAlchemy's pysqlite recipe).

    Left to itself, pysqlite opens a transaction only at the first write, so whatever a unit
    of work read before it is not protected: two writers read the same row, both write, and
    the second silently overwrites the first (a lost update). Here every transaction begins at
    its first statement, and a writer begins with `BEGIN IMMEDIATE`: it takes the database's
    one write lock up front, so writers queue one after the other (the busy timeout is the
    queue) and every read-modify-write is serialised, the way `SELECT … FOR UPDATE` makes it on
    PostgreSQL. Sessions that only read (`read_only_sessionmaker`) begin deferred and never
    wait: WAL gives them a snapshot while a writer works. Transactions must therefore stay
    short and never wait for the network while holding the lock (docs/faults.md).
    """

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # no implicit BEGIN: ours below, at the start
        cur = dbapi_conn.cursor()
        # WAL lets readers work while a writer writes; busy_timeout queues the writers.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    # Writers of one process queue on a lock of their own before asking SQLite: SQLite's busy
    # handler polls with sleeps of up to 100 ms, so under contention the lock sits free while
    # the waiters sleep, and throughput collapses. Another process on the same file (a CLI
    # command) still meets SQLite's own busy timeout.
    queue = _writer_queue(engine.url.database or "")

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get(READ_ONLY):
            conn.exec_driver_sql("BEGIN")
            return
        wait_ms = int(options.get(BUSY_TIMEOUT_MS, SQLITE_BUSY_TIMEOUT_MS))
        started = time.monotonic()
        if not queue.acquire(timeout=wait_ms / 1000):
            raise OperationalError(
                "BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked")
            )
        conn.info[_HOLDS_WRITER_QUEUE] = queue
        try:
            left_ms = max(1, wait_ms - int((time.monotonic() - started) * 1000))
            conn.exec_driver_sql(f"PRAGMA busy_timeout={left_ms}")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            _leave_queue(conn.info)
            raise

    @event.listens_for(engine, "commit")
    def _sqlite_commit(conn: Connection) -> None:
        _leave_queue(conn.info)

    @event.listens_for(engine, "rollback")
    def _sqlite_rollback(conn: Connection) -> None:
        _leave_queue(conn.info)

    @event.listens_for(engine.pool, "checkin")
    def _sqlite_checkin(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:  # a safety net: a connection never goes back still queued
            _leave_queue(record.info)


_HOLDS_WRITER_QUEUE = "citypark_writer_queue"
_writer_queues: dict[str, threading.Lock] = {}
_writer_queues_guard = threading.Lock()


def _writer_queue(database: str) -> threading.Lock:
    """One queue per database file and process, whichever engines open it."""
    key = os.path.realpath(database) if database and database != ":memory:" else database
    with _writer_queues_guard:
        return _writer_queues.setdefault(key, threading.Lock())


def _leave_queue(info: dict[Any, Any]) -> None:
    queue = info.pop(_HOLDS_WRITER_QUEUE, None)
    if queue is not None:
        queue.release()


def make_sessionmaker(
    engine: Engine, *, busy_timeout_ms: int | None = None
) -> sessionmaker[Session]:
    """Sessions that may write. `busy_timeout_ms` bounds how long one waits for SQLite's write
    lock (requests wait less than workers, so a busy city answers 429 instead of hanging)."""
    if busy_timeout_ms is not None:
        engine = engine.execution_options(**{BUSY_TIMEOUT_MS: busy_timeout_ms})
    return sessionmaker(bind=engine, expire_on_commit=False)


def read_only_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that only read: on SQLite they never take (or wait for) the write lock."""
    return sessionmaker(bind=engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as db, db.begin():
        yield db
