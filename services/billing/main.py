"""The billing service as a deployable part."""

from __future__ import annotations

from pathlib import Path

from services.billing import consumers, endpoints
from services.billing.provider.sandbox import SandboxProvider
from shared.runtime import Migrations, Part, Runtime


def _plug_providers(rt: Runtime) -> None:
    rt.providers.setdefault("sandbox", SandboxProvider(rt.settings.paysandbox_url))


part = Part(
    name="billing",
    routers=[endpoints.auth, endpoints.me, endpoints.admin, endpoints.internal],
    workers=consumers.workers,
    migrations=Migrations(Path(__file__).parent / "migrations", "alembic_version_billing"),
    on_startup=_plug_providers,
)
