"""The gateway as a deployable part: the connector API, the gate state and the proxy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from services.gateway.connector import eligibility
from services.gateway.connector import endpoints as connector
from services.gateway.connector.admission import Admission
from services.gateway.deadletters import endpoints as deadletters
from services.gateway.districts import endpoints as districts
from services.gateway.districts import service as district_service
from services.gateway.gate import consumers
from services.gateway.offline import endpoints as offline
from services.gateway.ops import endpoints as ops
from services.gateway.tokens import endpoints as tokens
from services.gateway.tokens import service as token_service
from shared.auth import Revocations
from shared.bus.outbox import run_relay
from shared.doors import GENERAL_MAX_BODY_BYTES, BodyLimit
from shared.runtime import Migrations, Part, Runtime, Worker
from shared.settings import BusKind

# The embedded city serves the connector API from the process that also runs every consumer and
# worker under one interpreter lock: fewer requests at once keep each one within the car
# park's timeout, the rest are told to come back.
EMBEDDED_MAX_IN_FLIGHT = 12


def _admission(app: FastAPI, rt: Runtime) -> None:
    limit = rt.settings.connector_max_in_flight
    if rt.source == "city":
        limit = min(limit, EMBEDDED_MAX_IN_FLIGHT)
    app.add_middleware(Admission, limit=limit)
    app.add_middleware(BodyLimit, limit_for=_body_limit(rt))


def _body_limit(rt: Runtime) -> Callable[[str], int]:
    """Bytes a request body may have, by route: counted as they arrive (shared/doors.py)."""

    def limit_for(path: str) -> int:
        if path.startswith("/v1/connector/"):
            return rt.settings.connector_max_body_bytes
        if path.startswith("/v1/districts/"):
            return district_service.limits(rt).max_body_bytes or GENERAL_MAX_BODY_BYTES
        return GENERAL_MAX_BODY_BYTES

    return limit_for


def _workers(rt: Runtime) -> list[Worker]:
    out = consumers.workers(rt)
    # Hashes newly eligible vehicles for every post-pay car park ahead of their next snapshot.
    out.append(eligibility.warmer(rt))
    if rt.settings.bus is BusKind.kafka:
        # Ops' writes here (replays) are audited through the gateway's outbox: someone must
        # publish it (on the embedded log the outbox already is the bus).
        out.append(lambda stop: run_relay(rt.sessionmaker, rt.bus, "gateway", stop))
    return out


def _on_app(app: FastAPI, rt: Runtime) -> None:
    _admission(app, rt)
    # The process serving the gateway reads revocations from its own table instead of asking
    # itself over HTTP; revoking here takes effect in this process at once.
    rt.revocations = Revocations(token_service.table_source(rt.read_sessionmaker))


part = Part(
    name="gateway",
    routers=[
        connector.router,
        offline.router,
        districts.router,
        ops.router,
        deadletters.router,
        tokens.router,
        tokens.internal,
    ],
    workers=_workers,
    on_app=_on_app,
    migrations=Migrations(Path(__file__).parent / "migrations", "alembic_version_gateway"),
)
