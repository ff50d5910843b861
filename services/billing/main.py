"""The billing service as a deployable part."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from services.billing import consumers, endpoints, retention
from services.billing.driver import gate_endpoints
from services.billing.invoice import endpoints as invoice_endpoints
from services.billing.merchant import endpoints as merchant_endpoints
from services.billing.notification import endpoints as notification_endpoints
from services.billing.provider import endpoints as provider_endpoints
from services.billing.provider.sandbox import SandboxProvider
from services.billing.reconciliation import endpoints as reconciliation_endpoints
from services.billing.refund import endpoints as refund_endpoints
from services.billing.rights import endpoints as rights_endpoints
from services.billing.rights import service as rights
from services.billing.settlement import endpoints as settlement_endpoints
from services.billing.signin import endpoints as signin_endpoints
from services.billing.stuck import endpoints as stuck_endpoints
from services.billing.vehicle import endpoints as vehicle_endpoints
from services.billing.vehicle.registry import HttpVehicleRegistry
from shared.auth import DriverCutoffs
from shared.keys import Purpose, derive_hex
from shared.runtime import Migrations, Part, Runtime, Worker
from shared.settings import Settings


def sandbox_notify_secret(settings: Settings) -> str:
    """The secret the sandbox signs notifications with (the same derivation on both sides)."""
    if settings.paysandbox_notify_secret is not None:
        return settings.paysandbox_notify_secret.get_secret_value()
    return derive_hex(settings.jwt_secret.get_secret_value(), Purpose.paysandbox_notify)


def _plug_providers(rt: Runtime) -> None:
    s = rt.settings
    notify_url = (
        s.paysandbox_notify_url or s.billing_url.rstrip("/") + "/v1/providers/sandbox/notifications"
    )
    rt.providers.setdefault(
        "sandbox",
        SandboxProvider(
            s.paysandbox_url,
            notify_url=notify_url,
            notify_secret=sandbox_notify_secret(s),
            token=derive_hex(s.jwt_secret.get_secret_value(), Purpose.paysandbox),
        ),
    )
    if rt.vehicle_registry is None:
        rt.vehicle_registry = HttpVehicleRegistry(
            s.vehicle_registry_url,
            token=derive_hex(s.jwt_secret.get_secret_value(), Purpose.vehicleregistry),
        )


def _on_app(app: FastAPI, rt: Runtime) -> None:
    # The process serving billing reads drivers' token cut-offs from its own table instead of
    # asking itself over HTTP; a cut-off set here takes effect in this process at once.
    rt.driver_cutoffs = DriverCutoffs(rights.table_cutoffs(rt.read_sessionmaker, rt.settings))


def _workers(rt: Runtime) -> list[Worker]:
    return [*consumers.workers(rt), retention.worker(rt)]


part = Part(
    name="billing",
    routers=[
        signin_endpoints.auth,
        signin_endpoints.admin,
        endpoints.me,
        endpoints.admin,
        endpoints.internal,
        gate_endpoints.internal,
        refund_endpoints.me,
        refund_endpoints.admin,
        settlement_endpoints.admin,
        reconciliation_endpoints.admin,
        provider_endpoints.router,
        merchant_endpoints.admin,
        merchant_endpoints.merchant,
        invoice_endpoints.me,
        stuck_endpoints.internal,
        notification_endpoints.me,
        vehicle_endpoints.me,
        vehicle_endpoints.internal,
        rights_endpoints.me,
        rights_endpoints.internal,
    ],
    workers=_workers,
    on_app=_on_app,
    migrations=Migrations(Path(__file__).parent / "migrations", "alembic_version_billing"),
    on_startup=_plug_providers,
)
