"""How fast the gateway rebuilds its gate state for a large city (figure in docs/gate.md).

    .venv/bin/python -m loadtests.gate_rebuild run --vehicles 100000 --sessions 20000

Loopback only and bounded: a scratch PostgreSQL database (dropped afterwards) gets the
synthetic drivers (one vehicle each) and open sessions; billing and sessions serve their
internal gate endpoints from a child process (no workers, so no consumer group is joined);
this process empties one Redis database and rebuilds into it, as the gateway would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated

import httpx
import redis
import typer
from pydantic import SecretStr
from sqlalchemy import insert

from shared.settings import BusKind, CacheKind, Settings

app = typer.Typer(add_completion=False)
SECRET = "gate-rebuild-bench-secret-long-enough-for-hs256"


def _settings(database_url: str, redis_url: str, port: int) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        bus=BusKind.kafka,
        cache=CacheKind.redis,
        jwt_secret=SecretStr(SECRET),
        billing_url=f"http://127.0.0.1:{port}",
        sessions_url=f"http://127.0.0.1:{port}",
    )


def _seed(settings: Settings, vehicles: int, sessions: int) -> float:
    from loadtests.ownership import proven_row
    from services.billing.driver.models import Driver
    from services.billing.vehicle.models import Vehicle
    from services.sessions.models import ParkingSession, SessionStatus
    from shared.pii_columns import index_of
    from shared.runtime import Runtime

    rt = Runtime(settings, source="bench")
    started = time.monotonic()
    now = datetime.now(UTC)
    chunk = 10_000
    with rt.sessionmaker() as db, db.begin():
        for start in range(0, vehicles, chunk):
            ids = [str(uuid.uuid4()) for _ in range(start, min(start + chunk, vehicles))]
            db.execute(
                insert(Driver),
                [
                    {
                        "id": d,
                        "phone": f"1{start + i:010}",
                        "phone_bidx": index_of(settings, "phone", f"1{start + i:010}"),
                        "state_version": 3,
                        "postpay_published": "active" if (start + i) % 10 else "suspended",
                    }
                    for i, d in enumerate(ids)
                ],
            )
            db.execute(
                insert(Vehicle),
                [proven_row(d, f"苏E{start + i:06}", settings=settings) for i, d in enumerate(ids)],
            )
        for start in range(0, sessions, chunk):
            db.execute(
                insert(ParkingSession),
                [
                    {
                        "id": str(uuid.uuid4()),
                        "lot_id": f"lot-{i % 3000}",
                        "lot_code": "B",
                        "district": "gusu",
                        "operator_id": "op",
                        "plate": f"苏E{i:06}",
                        "plate_bidx": index_of(settings, "plate", f"苏E{i:06}"),
                        "plate_color": "blue",
                        "vehicle_type": "small",
                        "status": SessionStatus.open,
                        "entry_event_id": f"bench/{uuid.uuid4()}",
                        "entered_at": now - timedelta(minutes=i % 600),
                    }
                    for i in range(start, min(start + chunk, sessions))
                ],
            )
    return time.monotonic() - started


@app.command()
def serve(database_url: str, port: int) -> None:
    """The child: billing's and the sessions service's routers, no workers."""
    import uvicorn

    from services import city
    from services.billing.main import part as billing
    from services.sessions.main import part as sessions
    from shared.runtime import Runtime

    settings = _settings(database_url, "redis://127.0.0.1:6379/15", port)
    rt = Runtime(settings, source="bench")
    uvicorn.run(
        city.build_app(rt, [billing, sessions], workers=[]),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )


@app.command()
def run(
    vehicles: Annotated[int, typer.Option(min=1, max=1_000_000)] = 100_000,
    sessions: Annotated[int, typer.Option(min=0, max=1_000_000)] = 20_000,
    page_size: Annotated[int, typer.Option(min=1, max=5000)] = 2000,
    redis_db: Annotated[int, typer.Option(help="A Redis database of your own; emptied.")] = 5,
    port: int = 18471,
) -> None:
    """Seed, serve, rebuild twice (after a loss, then on a healthy state), report."""
    from services import city
    from services.gateway.gate import rebuild
    from shared.runtime import Runtime
    from tests.conftest import _infra, scratch_database

    infra = _infra()
    redis_url = infra.redis_url.rsplit("/", 1)[0] + f"/{redis_db}"
    with scratch_database(infra) as database_url:
        settings = _settings(database_url, redis_url, port)
        city.migrate(settings)
        seeded = _seed(settings, vehicles, sessions)
        print(f"seeded {vehicles} drivers/vehicles and {sessions} open sessions in {seeded:.1f} s")
        child = subprocess.Popen(
            [sys.executable, "-m", "loadtests.gate_rebuild", "serve", database_url, str(port)],
            env={**os.environ, "CITYPARK_LOG_LEVEL": "WARNING"},
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).is_success:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or child.poll() is not None:
                    raise SystemExit("the services did not start")
                time.sleep(0.2)
            redis.Redis.from_url(redis_url).flushdb()  # Redis lost everything
            rt = Runtime(settings, source="gateway")
            lost = rebuild.rebuild(rt, page_size=page_size)
            print("after a loss:    " + lost.summary())
            healthy = rebuild.rebuild(rt, page_size=page_size)
            print("healthy, again:  " + healthy.summary())
        finally:
            child.terminate()
            child.wait(timeout=15)
            redis.Redis.from_url(redis_url).flushdb()


if __name__ == "__main__":
    app()
