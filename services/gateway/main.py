"""The gateway as a deployable part: the connector API, the gate state and the proxy."""

from __future__ import annotations

from pathlib import Path

from services.gateway.connector import endpoints as connector
from services.gateway.deadletters import endpoints as deadletters
from services.gateway.districts import endpoints as districts
from services.gateway.gate import consumers
from services.gateway.ops import endpoints as ops
from shared.runtime import Migrations, Part

part = Part(
    name="gateway",
    routers=[connector.router, districts.router, ops.router, deadletters.router],
    workers=consumers.workers,
    migrations=Migrations(Path(__file__).parent / "migrations", "alembic_version_gateway"),
)
