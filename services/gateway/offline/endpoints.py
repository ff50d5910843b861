"""Offline claims for city ops: what the gates decided offline that the city did not back."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from services.gateway.offline import service
from services.gateway.offline.schemas import OfflineClaimOut
from shared.deps import DbSession
from shared.masking import UNMASK_RESPONSES, View, staff_view
from shared.wire import AwareInstant

router = APIRouter(prefix="/v1/admin", tags=["admin: gates"])


@router.get("/unbacked-claims", response_model=list[OfflineClaimOut], responses=UNMASK_RESPONSES)
def list_claims(
    view: Annotated[View, Depends(staff_view("gateway", "offline_claim"))],
    db: DbSession,
    lot_id: str | None = None,
    since: AwareInstant | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[OfflineClaimOut]:
    """Offline gate decisions the city did not take as stated, newest first: an offline
    `postpay` it could not back (decided as the city decides now; the operator takes it up
    with the driver), or a `pay_on_site`/`free` where the city would have said `postpay`
    (nothing charged afterwards). See docs/gate.md, "Offline decisions"."""
    out = [
        OfflineClaimOut.model_validate(row, from_attributes=True)
        for row in service.claims(db, lot_id=lot_id, since=since, limit=limit)
    ]
    for claim in out:
        claim.plate = view.plate(claim.plate)  # masked unless an admin asked, with a reason
    return out
