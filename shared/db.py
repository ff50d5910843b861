"""Database engines and sessions for PostgreSQL (real topology) and SQLite (embedded default)."""

from __future__ import annotations

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
    short and never wait for the network while holding the lock (docs/reliability.md).
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

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get(READ_ONLY):
            conn.exec_driver_sql("BEGIN")
            return
        wait_ms = int(options.get(BUSY_TIMEOUT_MS, SQLITE_BUSY_TIMEOUT_MS))
        conn.exec_driver_sql(f"PRAGMA busy_timeout={wait_ms}")
        conn.exec_driver_sql("BEGIN IMMEDIATE")


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
