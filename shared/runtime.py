"""What one process holds: settings, the database, Redis and the bus, created once and shared."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import redis
from fastapi import APIRouter, FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm import sessionmaker as SessionFactory  # not shadowed by the properties

from shared.auth import DriverCutoffs, Revocations, billing_cutoffs, gateway_revocations
from shared.bus.port import EventBus
from shared.db import make_engine, make_sessionmaker, read_only_sessionmaker
from shared.internal import InternalClient
from shared.settings import Settings

Worker = Callable[[threading.Event], None]
REQUEST_BUSY_TIMEOUT_MS = 3_000


@dataclass
class Runtime:
    settings: Settings
    source: str  # the service name, used as CloudEvents `source` and outbox owner
    # Adapters a service plugs in at start-up (e.g. billing's payment providers).
    providers: dict[str, Any] = field(default_factory=dict)
    # Billing's vehicle registry port (proof of ownership), plugged at start-up like those.
    vehicle_registry: Any = None
    internal_clients: dict[str, InternalClient] = field(default_factory=dict)

    @cached_property
    def engine(self) -> Engine:
        from shared.pii_columns import bind_data_keys

        # Encrypted columns (phones, plates) use this process's data keys.
        return bind_data_keys(make_engine(self.settings.database_url), self.settings)

    @cached_property
    def sessionmaker(self) -> sessionmaker[Session]:
        """Sessions for workers: on SQLite they wait as long as it takes for the write lock."""
        return make_sessionmaker(self.engine)

    @cached_property
    def request_sessionmaker(self) -> SessionFactory[Session]:
        """Sessions for API requests: a request that cannot get SQLite's write lock soon is
        answered 429 with `Retry-After` (the city pushes back) instead of hanging."""
        return make_sessionmaker(self.engine, busy_timeout_ms=REQUEST_BUSY_TIMEOUT_MS)

    @cached_property
    def read_sessionmaker(self) -> SessionFactory[Session]:
        return read_only_sessionmaker(self.engine)

    @cached_property
    def redis(self) -> redis.Redis:
        from shared.cache import make_redis

        return make_redis(self.settings)

    @cached_property
    def bus(self) -> EventBus:
        from shared.bus.factory import make_bus

        return make_bus(self.settings, self.sessionmaker, self.source)

    def internal(self, service: str) -> InternalClient:
        """A client for another service's internal API (`lots`, `sessions`, `billing`)."""
        client = self.internal_clients.get(service)
        if client is None:
            url = getattr(self.settings, f"{service}_url")
            client = self.internal_clients[service] = InternalClient(url, self.secret)
        return client

    @property
    def secret(self) -> str:
        """The master secret; each use derives its own key from it (shared/keys.py)."""
        return self.settings.jwt_secret.get_secret_value()

    @cached_property
    def revocations(self) -> Revocations:
        """Revoked admin tokens, asked of the gateway; a process that serves the gateway
        replaces this with its own table (services/gateway/main.py)."""
        return Revocations(gateway_revocations(self.settings.gateway_url, self.secret))

    @cached_property
    def driver_cutoffs(self) -> DriverCutoffs:
        """Drivers' token cut-offs, asked of billing; a process that serves billing replaces
        this with its own table (services/billing/main.py)."""
        return DriverCutoffs(billing_cutoffs(self.settings.billing_url, self.secret))


@dataclass(frozen=True)
class Migrations:
    script_location: Path
    version_table: str


@dataclass
class Part:
    """One deployable part of the city: its HTTP routers, background workers and migrations."""

    name: str
    routers: list[APIRouter] = field(default_factory=list)
    workers: Callable[[Runtime], list[Worker]] = lambda rt: []
    migrations: Migrations | None = None
    on_startup: Callable[[Runtime], None] = lambda rt: None
    # Middleware the part puts in front of the app it is served in (e.g. admission control).
    on_app: Callable[[FastAPI, Runtime], None] = lambda app, rt: None


def attach(app: FastAPI, rt: Runtime) -> None:
    app.state.settings = rt.settings
    app.state.sessionmaker = rt.sessionmaker
    app.state.request_sessionmaker = rt.request_sessionmaker
    app.state.read_sessionmaker = rt.read_sessionmaker
    app.state.runtime = rt
