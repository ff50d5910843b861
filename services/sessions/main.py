"""The sessions service as a deployable part."""

from __future__ import annotations

from pathlib import Path

from services.sessions import consumers, endpoints, gate_endpoints, retention, rights
from shared.runtime import Migrations, Part

part = Part(
    name="sessions",
    routers=[
        endpoints.driver,
        endpoints.admin,
        endpoints.internal,
        gate_endpoints.internal,
        rights.internal,
    ],
    workers=lambda rt: [*consumers.workers(rt), retention.worker(rt)],
    migrations=Migrations(Path(__file__).parent / "migrations", "alembic_version_sessions"),
)
