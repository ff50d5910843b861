"""The sandbox vehicle registry as a deployable part (its own app; mounted at
/sandbox/vehicle-registry when the city runs embedded in sandbox mode)."""

from __future__ import annotations

from pathlib import Path

from services.vehicleregistry import endpoints
from shared.runtime import Migrations, Part

part = Part(
    name="vehicleregistry",
    routers=[endpoints.router],
    migrations=Migrations(Path(__file__).parent / "migrations", "alembic_version_vehicleregistry"),
)
