"""Billing's parked work, for the gateway's dead-letter view and for ops' replay."""

from __future__ import annotations

from fastapi import APIRouter

from services.billing.stuck import service
from services.billing.stuck.schemas import ParkedKind, ParkedOut
from shared.auth import InternalAuth
from shared.deps import DbSession

internal = APIRouter(prefix="/internal/billing/parked", include_in_schema=False)


@internal.get("", response_model=ParkedOut)
def parked(_: InternalAuth, db: DbSession) -> ParkedOut:
    return service.parked(db)


@internal.post("/{kind}/{item_id}/replay", status_code=204)
def replay(kind: ParkedKind, item_id: str, _: InternalAuth, db: DbSession) -> None:
    service.replay(db, kind, item_id)
