"""Request-scoped dependencies: the request owns the transaction."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

_READS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_db(request: Request) -> Iterator[Session]:
    """The request's unit of work. A GET only reads (on SQLite it never waits for the write
    lock); any other method may write and waits a bounded time for it."""
    state = request.app.state
    factory = getattr(state, "request_sessionmaker", None) or state.sessionmaker
    if request.method in _READS:
        factory = getattr(state, "read_sessionmaker", None) or factory
    with factory() as db, db.begin():
        yield db


def get_read_db(request: Request) -> Iterator[Session]:
    """For a POST that only reads (prices, quotes): never waits for SQLite's write lock."""
    state = request.app.state
    factory = getattr(state, "read_sessionmaker", None) or state.sessionmaker
    with factory() as db, db.begin():
        yield db


# scope="function": the commit happens before the response leaves, so a 2xx means committed.
DbSession = Annotated[Session, Depends(get_db, scope="function")]
ReadDbSession = Annotated[Session, Depends(get_read_db, scope="function")]
