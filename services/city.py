"""Composition root: assembles the parts into processes. The only module that sees them all."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable

import anyio
import structlog
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from sqlalchemy import select

from services.billing.main import part as billing
from services.gateway import proxy
from services.gateway.docs import install_merged_openapi
from services.gateway.main import part as gateway
from services.lots.districts import adapter, provision
from services.lots.main import part as lots
from services.lots.models import District
from services.paysandbox.main import part as paysandbox
from services.sessions.main import part as sessions
from services.vehicleregistry.main import part as vehicleregistry
from shared import idempotency
from shared.bus.migrations_path import BUS_MIGRATIONS
from shared.doors import DOOR_HEADER, InternalDoor, new_door_token
from shared.http import make_app
from shared.migrate import upgrade
from shared.runtime import Part, Runtime, Worker, attach
from shared.settings import Settings
from shared.shutdown import Shutdown, log_stopped, start_workers

log = structlog.get_logger(__name__)

PARTS: dict[str, Part] = {
    p.name: p for p in (gateway, lots, sessions, billing, paysandbox, vehicleregistry)
}

DESCRIPTION = """
CityPark — one city, one account, leave first and pay afterwards.

* **Connector** (`/v1/connector`): car parks report entries and exits, signed with
  RFC 9421 HTTP Message Signatures (Ed25519); the exit answer is the gate decision.
* **Drivers** (`/v1/auth`, `/v1/me`, `/v1/lots`, `/v1/quotes`): sign in with a one-time code,
  bind one payment account, register plates, see parkings and charges.
* **City ops** (`/v1/admin`): districts, operators, car parks, keys, tariffs, ledger.

Errors are `application/problem+json` (RFC 9457) with a stable `code`.
"""


def migrate(settings: Settings, parts: Iterable[Part] = PARTS.values()) -> None:
    upgrade(BUS_MIGRATIONS, settings.database_url, "alembic_version_bus")
    for part in parts:
        if part.migrations:
            upgrade(
                part.migrations.script_location,
                settings.database_url,
                part.migrations.version_table,
                settings,
            )


def district_codes(rt: Runtime) -> list[str]:
    with rt.sessionmaker() as db:
        return list(db.scalars(select(District.code).order_by(District.code)))


def build_app(
    rt: Runtime,
    parts: list[Part],
    *,
    workers: list[Worker],
    forward: bool = False,
    mount_sandbox: Runtime | None = None,
    title: str = "CityPark",
) -> FastAPI:
    # The server begins the shutdown on SIGTERM, so workers stop while requests drain; the
    # lifespan's end begins it otherwise (tests, an embedding server).
    shutdown = Shutdown()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threads = start_workers(workers, shutdown.stop)
        log.info("process.ready", parts=[p.name for p in parts], workers=len(threads))
        yield
        # Joined off the event loop: a worker's last internal call to this very app (the
        # embedded city calls itself) must still be served while the workers wind down.
        stopped, running = await anyio.to_thread.run_sync(shutdown.join, threads)
        log_stopped(shutdown, stopped, running, parts=[p.name for p in parts])

    app = make_app(title, DESCRIPTION)
    app.state.shutdown = shutdown
    app.router.lifespan_context = lifespan
    attach(app, rt)
    if not forward:  # behind the gateway's proxy the owning service keeps the answers
        idempotency.install(app)
    for part in parts:
        for router in part.routers:
            app.include_router(router)
        part.on_app(app, rt)
    if forward:
        app.include_router(proxy.make_router(rt.settings))
    if mount_sandbox is not None:
        sandbox_app = make_app(
            "CityPark payment sandbox", "A withholding provider to test against."
        )
        attach(sandbox_app, mount_sandbox)
        for router in paysandbox.routers:
            sandbox_app.include_router(router)
        app.mount("/sandbox/pay", sandbox_app)
        if mount_sandbox.settings.sandbox_mode:
            # The vehicle registry billing proves ownership against (vehicle_registry_url).
            registry_app = make_app(
                "CityPark vehicle registry sandbox", "Plates with their owner and VIN."
            )
            attach(registry_app, mount_sandbox)
            for router in vehicleregistry.routers:
                registry_app.include_router(router)
            app.mount("/sandbox/vehicle-registry", registry_app)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/docs")

    return app


def embedded(settings: Settings) -> tuple[FastAPI, Runtime]:
    """The whole city in one process on the embedded default (SQLite, log table, fakeredis)."""
    migrate(settings)
    rt = Runtime(settings, source="city")
    provision.configure(settings)
    for part in PARTS.values():
        part.on_startup(rt)
    workers: list[Worker] = []
    for part in (gateway, lots, sessions, billing):
        workers += part.workers(rt)
    # Every district, and any that ops add while the city runs, gets its adapter.
    workers.append(adapter.every_district(rt))
    sandbox = Runtime(settings, source="paysandbox")
    workers += paysandbox.workers(sandbox)  # its notifications, retried until acknowledged
    app = build_app(rt, [gateway, lots, sessions, billing], workers=workers, mount_sandbox=sandbox)
    # The services call each other's /internal routes on this same public app: only the calls
    # made by this process (they carry its door token) keep their internal header.
    door = new_door_token()
    app.add_middleware(InternalDoor, token=door)
    for service in ("lots", "sessions", "billing"):
        rt.internal(service).http.headers[DOOR_HEADER] = door
    app.state.door_token = door
    return app, rt


def single(settings: Settings, name: str) -> FastAPI:
    """One service as its own process (the real topology)."""
    part = PARTS[name]
    rt = Runtime(settings, source=name)
    provision.configure(settings)  # a district added here gets its Kafka topic
    part.on_startup(rt)
    app = build_app(
        rt, [part], workers=part.workers(rt), forward=name == "gateway", title=f"CityPark {name}"
    )
    if name == "gateway":
        s = rt.settings
        install_merged_openapi(app, [s.lots_url, s.sessions_url, s.billing_url])
    return app
