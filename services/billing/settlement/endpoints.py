"""Daily settlement runs and their results (JSON, or CSV with `Accept: text/csv`)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse

from services.billing.settlement import service as settlements
from services.billing.settlement.schemas import SettlementDay, SettlementRunIn
from shared import audit
from shared.auth import FinanceAuth, ViewerAuth
from shared.deps import DbSession
from shared.http import problem_responses
from shared.wire import IsoDate

admin = APIRouter(prefix="/v1/admin", tags=["admin: billing"])


@admin.post(
    "/settlements/runs",
    response_model=SettlementDay,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"description": "the day had been run already: its result, unchanged"},
        **problem_responses(settlements.DayOpen),
    },
)
def run(data: SettlementRunIn, who: FinanceAuth, db: DbSession) -> JSONResponse:
    """Settle a finished Asia/Shanghai day per operator; idempotent per date (201 then 200).
    The run that settles the day is audited; asking again changes nothing and is not."""
    created, result = settlements.run(db, data.date)
    if created:
        audit.record(
            db,
            who,
            service="billing",
            action="settlement.run",
            entity="settlement",
            entity_id=data.date.isoformat(),
            after={
                "operators": len(result.settlements),
                "payout_fen": sum(s.payout_fen for s in result.settlements),
            },
        )
    return JSONResponse(
        result.model_dump(mode="json"),
        status_code=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
    )


@admin.get(
    "/settlements",
    response_model=SettlementDay,
    responses={
        200: {"content": {"text/csv": {}}},
        **problem_responses(settlements.NotRun),
    },
)
def get(date: IsoDate, request: Request, _: ViewerAuth, db: DbSession) -> SettlementDay | Response:
    """A day's settlement per operator; `Accept: text/csv` for the file sent to operators."""
    result = settlements.stored(db, date)
    if result is None:
        raise settlements.NotRun(f"Run POST /v1/admin/settlements/runs for {date} first")
    if "text/csv" in request.headers.get("accept", ""):
        return Response(
            settlements.to_csv(result),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="settlement-{date}.csv"'},
        )
    return result
