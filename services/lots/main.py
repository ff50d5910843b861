"""The lots service as a deployable part."""

from __future__ import annotations

from pathlib import Path

import structlog

from services.lots import consumers, endpoints, occupancy, passes_endpoints, service
from services.lots.districts import endpoints as districts
from shared.db import transaction
from shared.runtime import Migrations, Part, Runtime

log = structlog.get_logger(__name__)


def _startup(rt: Runtime) -> None:
    with transaction(rt.sessionmaker) as db:
        service.seed_districts(db)
    with rt.sessionmaker() as db:
        # Redis may be fresh (the embedded default always is): put every lot back on the map.
        lots = occupancy.rebuild(db, rt.redis)
    log.info("lots.map_rebuilt", lots=lots)


part = Part(
    name="lots",
    routers=[
        endpoints.admin,
        endpoints.public,
        endpoints.internal,
        districts.internal,
        passes_endpoints.internal,
    ],
    workers=lambda rt: [*consumers.workers(rt), *consumers.audit_workers(rt)],
    migrations=Migrations(Path(__file__).parent / "migrations", "alembic_version_lots"),
    on_startup=_startup,
)
