"""Request-scoped dependencies: the request owns the transaction."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session


def get_db(request: Request) -> Iterator[Session]:
    factory = request.app.state.sessionmaker
    with factory() as db, db.begin():
        yield db


# scope="function": the commit happens before the response leaves, so a 2xx means committed.
DbSession = Annotated[Session, Depends(get_db, scope="function")]
