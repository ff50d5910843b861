"""The lots service as a deployable part."""

from __future__ import annotations

from pathlib import Path

from services.lots import endpoints, service
from shared.db import transaction
from shared.runtime import Migrations, Part, Runtime


def _seed(rt: Runtime) -> None:
    with transaction(rt.sessionmaker) as db:
        service.seed_districts(db)


part = Part(
    name="lots",
    routers=[endpoints.admin, endpoints.public, endpoints.internal],
    migrations=Migrations(Path(__file__).parent / "migrations", "alembic_version_lots"),
    on_startup=_seed,
)
