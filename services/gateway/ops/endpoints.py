"""City-wide figures for ops (aggregated from the services) and the web console."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from shared.auth import ViewerAuth
from shared.runtime import Runtime
from shared.timeutil import utcnow

router = APIRouter(tags=["admin: city"])
CONSOLE = Path(__file__).with_name("console.html")


class Growth(BaseModel):
    period_days: int
    new_drivers: int
    parkings: int
    captured_fen: int


class CityStats(BaseModel):
    districts: int
    operators: int
    lots_connected: int
    capacity: int
    registered_drivers: int
    enrolled_drivers: int
    parkings_served: int
    open_sessions: int
    postpay_parkings: int
    charges_captured: int
    captured_fen: int
    arrears_fen: int
    growth: Growth


@router.get("/v1/admin/stats", response_model=CityStats)
async def city_stats(
    _: ViewerAuth, request: Request, days: Annotated[int, Query(ge=1, le=3650)] = 30
) -> CityStats:
    """The city's headline figures, and growth over the last `days`."""
    rt: Runtime = request.app.state.runtime
    since = (utcnow() - timedelta(days=days)).isoformat()

    def gather() -> dict[str, dict[str, Any]]:
        return {
            "lots": rt.internal("lots").call("GET", "/internal/lots/stats"),
            "sessions": rt.internal("sessions").call(
                "GET", f"/internal/sessions/stats?since={since.replace('+', '%2B')}"
            ),
            "billing": rt.internal("billing").call(
                "GET", f"/internal/billing/stats?since={since.replace('+', '%2B')}"
            ),
        }

    got = await run_in_threadpool(gather)
    lots, sessions, billing = got["lots"], got["sessions"], got["billing"]
    return CityStats(
        districts=lots["districts"],
        operators=lots["operators"],
        lots_connected=lots["lots_connected"],
        capacity=lots["capacity"],
        registered_drivers=billing["registered_drivers"],
        enrolled_drivers=billing["enrolled_drivers"],
        parkings_served=sessions["parkings_served"],
        open_sessions=sessions["open_now"],
        postpay_parkings=sessions["postpay_parkings"],
        charges_captured=billing["charges_captured"],
        captured_fen=billing["captured_fen"],
        arrears_fen=billing["arrears_fen"],
        growth=Growth(
            period_days=days,
            new_drivers=billing["new_drivers_since"],
            parkings=sessions["parkings_since"],
            captured_fen=billing["captured_fen_since"],
        ),
    )


@router.get("/console", response_class=HTMLResponse, include_in_schema=False)
def console() -> HTMLResponse:
    """The ops console: a page over the admin API (the token stays in the browser)."""
    return HTMLResponse(CONSOLE.read_text(encoding="utf-8"))
