"""The payment sandbox as a deployable part (its own app; mounted at /sandbox/pay when embedded)."""

from __future__ import annotations

from pathlib import Path

from services.paysandbox import endpoints
from shared.runtime import Migrations, Part

part = Part(
    name="paysandbox",
    routers=[endpoints.router],
    migrations=Migrations(Path(__file__).parent / "migrations", "alembic_version_paysandbox"),
)
