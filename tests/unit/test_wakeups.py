"""Wake-ups after commit: set when the transaction commits, never on rollback."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from shared import wakeups


@pytest.fixture
def factory() -> sessionmaker[Session]:
    return sessionmaker(create_engine("sqlite://"))


def test_a_commit_wakes_the_waiting_worker(factory: sessionmaker[Session]) -> None:
    name = f"test:{uuid.uuid4().hex}"
    event = wakeups.wakeup(name)
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(event.wait(5)))
    waiter.start()
    with factory() as db, db.begin():
        db.execute(text("select 1"))
        wakeups.after_commit(db, name)
        assert not event.is_set()  # not before the commit
    waiter.join(5)
    assert woke == [True]
    assert wakeups.wakeup(name) is event  # one event per name and process


def test_a_rollback_wakes_nobody_and_leaves_nothing_for_the_next_commit(
    factory: sessionmaker[Session],
) -> None:
    name = f"test:{uuid.uuid4().hex}"
    with factory() as db:
        db.begin()
        wakeups.after_commit(db, name)
        db.rollback()
        assert not wakeups.wakeup(name).is_set()
        with db.begin():  # the next transaction of the same session commits other work
            db.execute(text("select 1"))
        assert not wakeups.wakeup(name).is_set()
        with db.begin():
            wakeups.after_commit(db, name)
        assert wakeups.wakeup(name).is_set()
