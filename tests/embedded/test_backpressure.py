"""When the city cannot keep up it pushes back (429 with Retry-After) instead of timing out:
too many connector requests at once, or a write lock that stays busy past a request's wait."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from services.gateway.connector.admission import Admission
from services.gateway.tokens import service as admin_tokens
from shared.auth import Role
from shared.db import make_engine, make_sessionmaker, transaction
from shared.http import make_app
from tests.embedded_city import embedded_city


def test_connector_requests_past_the_limit_are_pushed_back_at_once() -> None:
    release = asyncio.Event()
    app: FastAPI = make_app("t", "")

    @app.post("/v1/connector/entries")
    async def entries() -> dict[str, str]:
        await release.wait()
        return {"status": "accepted"}

    @app.get("/v1/lots")
    async def lots() -> list[str]:
        return []

    app.add_middleware(Admission, limit=2)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            held = [asyncio.create_task(client.post("/v1/connector/entries")) for _ in range(2)]
            await asyncio.sleep(0.05)  # both are in progress now
            busy = await client.post("/v1/connector/entries")
            assert busy.status_code == 429
            assert busy.headers["retry-after"] == "1"
            assert busy.json()["code"] == "city_busy"
            assert (await client.get("/v1/lots")).status_code == 200  # other APIs unaffected
            release.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            assert (await client.post("/v1/connector/entries")).status_code == 200

    asyncio.run(scenario())


def test_a_write_lock_busy_past_the_requests_wait_answers_429(tmp_path: Path) -> None:
    """A request that cannot get SQLite's write lock within its wait is told to come back,
    with nothing recorded, instead of hanging for the worker's 30 s."""
    db_file = tmp_path / "city.db"
    with embedded_city(db_file) as client:
        blocker = make_sessionmaker(make_engine(f"sqlite:///{db_file}"))
        holding = threading.Event()
        done = threading.Event()

        def hold_the_lock() -> None:
            with blocker() as db, db.begin():
                db.execute(text("SELECT 1"))  # BEGIN IMMEDIATE: the write lock is ours
                holding.set()
                done.wait(15)

        thread = threading.Thread(target=hold_the_lock)
        thread.start()
        try:
            assert holding.wait(10)
            answer = client.post("/v1/auth/otp", json={"phone": "13800000090"})
        finally:
            done.set()
            thread.join(timeout=10)
        assert answer.status_code == 429, answer.text
        assert answer.json()["code"] == "city_busy"
        assert answer.headers["retry-after"] == "1"
        # The lock free again, the same request goes through.
        assert client.post("/v1/auth/otp", json={"phone": "13800000090"}).status_code < 300


def test_readers_never_wait_for_a_writer(tmp_path: Path) -> None:
    db_file = tmp_path / "city.db"
    with embedded_city(db_file) as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        with transaction(rt.sessionmaker) as db:
            admin = {"Authorization": f"Bearer {admin_tokens.create(db, rt.secret, Role.viewer)}"}
        blocker = make_sessionmaker(make_engine(f"sqlite:///{db_file}"))
        holding, done = threading.Event(), threading.Event()

        def hold_the_lock() -> None:
            with blocker() as db, db.begin():
                db.execute(text("SELECT 1"))
                holding.set()
                done.wait(15)

        thread = threading.Thread(target=hold_the_lock)
        thread.start()
        try:
            assert holding.wait(10)
            for _ in range(3):
                answer = client.get("/v1/admin/operators", headers=admin)
                assert answer.status_code == 200, answer.text
        finally:
            done.set()
            thread.join(timeout=10)


def test_a_dependency_away_answers_503_and_a_bug_500() -> None:
    """Redis or the broker away for a moment is not a bug: the caller is told to come back."""
    import redis.exceptions
    from fastapi.testclient import TestClient

    app: FastAPI = make_app("t", "")

    @app.post("/redis-away")
    def redis_away() -> None:
        raise redis.exceptions.ConnectionError("Connection refused")

    @app.post("/bug")
    def bug() -> None:
        raise KeyError("lot_code")

    client = TestClient(app, raise_server_exceptions=False)
    away = client.post("/redis-away")
    assert (away.status_code, away.json()["code"]) == (503, "dependency_unavailable")
    assert away.headers["retry-after"] == "2"
    broken = client.post("/bug")
    assert (broken.status_code, broken.json()["code"]) == (500, "internal_error")
