"""Reconciliation against the provider's daily statement: run, list, resolve."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status

from services.billing.reconciliation import service as reconciliations
from services.billing.reconciliation.schemas import ReconciliationIn, ReconciliationOut, Resolution
from shared import audit
from shared.auth import FinanceAuth, ViewerAuth
from shared.deps import DbSession
from shared.errors import NotFound, UpstreamUnavailable
from shared.http import problem_responses
from shared.wire import IsoDate

admin = APIRouter(prefix="/v1/admin", tags=["admin: billing"])


@admin.post(
    "/reconciliations",
    status_code=status.HTTP_201_CREATED,
    response_model=ReconciliationOut,
    responses=problem_responses(
        reconciliations.ProviderUnknown, reconciliations.DayOutOfRange, UpstreamUnavailable
    ),
)
def run(
    data: ReconciliationIn, request: Request, who: FinanceAuth, db: DbSession
) -> ReconciliationOut:
    """Compare a day's captures and refunds with the provider's statement; the result is kept.
    Audited."""
    result = reconciliations.reconcile(
        db, request.app.state.runtime.providers, data.provider, data.date
    )
    audit.record(
        db,
        who,
        service="billing",
        action="reconciliation.run",
        entity="reconciliation",
        entity_id=result.id,
        after={
            "date": result.date.isoformat(),
            "provider": result.provider,
            "status": result.status,
            "matched": result.matched,
            "missing_ours": len(result.missing_ours),
            "missing_theirs": len(result.missing_theirs),
            "amount_mismatch": len(result.amount_mismatch),
        },
    )
    return result


@admin.get("/reconciliations", response_model=list[ReconciliationOut])
def listing(
    _: ViewerAuth,
    db: DbSession,
    date: IsoDate | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[ReconciliationOut]:
    """Reconciliations, newest first, optionally of one day."""
    return reconciliations.listing(db, date, limit)


@admin.post(
    "/reconciliations/{reconciliation_id}/resolution",
    response_model=ReconciliationOut,
    responses=problem_responses(NotFound, reconciliations.AlreadyResolved),
)
def resolve(
    reconciliation_id: str, data: Resolution, who: FinanceAuth, db: DbSession
) -> ReconciliationOut:
    """Finance closes a reconciliation's differences with a note of what was done. Audited."""
    result = reconciliations.resolve(db, reconciliation_id, who.id, data.note)
    audit.record(
        db,
        who,
        service="billing",
        action="reconciliation.resolve",
        entity="reconciliation",
        entity_id=result.id,
        after={"status": result.status, "resolution": result.resolution},
    )
    return result
