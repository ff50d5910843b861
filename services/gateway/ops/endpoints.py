"""City-wide figures for ops (aggregated from the services) and the web console."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from services.gateway.districts import figures as feed_figures
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


class DistrictFigures(BaseModel):
    """One district's share of the headline figures: lots and parkings from the lots service's
    registry and its count of closed sessions, money from billing's charges."""

    district: str
    name: str
    lots_connected: int
    lots_online: int
    lots_offline: int
    capacity: int
    free_spaces: int
    parkings_today: int
    parkings_served: int
    postpay_drivers: int = Field(0, description="Drivers who left here first and paid after")
    charges_captured: int = 0
    captured_fen: int = Field(0, description="Charges settled with the driver's account")
    charges_in_arrears: int = 0
    arrears_fen: int = Field(0, description="Declined charges not yet paid")


class CityStats(BaseModel):
    districts: int
    operators: int
    lots_connected: int
    lots_online: int = Field(description="Lots with a heartbeat in the last 5 minutes")
    lots_offline: int
    capacity: int
    free_spaces: int = Field(description="Live free spaces over all lots")
    registered_drivers: int
    enrolled_drivers: int
    parkings_served: int
    open_sessions: int
    postpay_parkings: int
    charges_captured: int
    captured_fen: int
    charges_in_arrears: int
    arrears_fen: int
    parkings_today: int = Field(description="Sessions closed today (Asia/Shanghai calendar)")
    growth: Growth
    by_district: list[DistrictFigures]
    district_feeds: list[feed_figures.DistrictFeed] = Field(
        default_factory=list,
        description="Per district platform: records pushed by outcome, rejects by reason, "
        "events per minute, consumer lag and last event time of its adapter",
    )


@router.get("/v1/admin/stats", response_model=CityStats)
async def city_stats(
    _: ViewerAuth, request: Request, days: Annotated[int, Query(ge=1, le=3650)] = 30
) -> CityStats:
    """The city's headline figures, the same per district, and growth over the last `days`."""
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
    feeds = await run_in_threadpool(feed_figures.gather, rt)
    lots, sessions, billing = got["lots"], got["sessions"], got["billing"]
    return CityStats(
        districts=lots["districts"],
        operators=lots["operators"],
        lots_connected=lots["lots_connected"],
        lots_online=lots["lots_online"],
        lots_offline=lots["lots_offline"],
        capacity=lots["capacity"],
        free_spaces=lots["free_spaces"],
        registered_drivers=billing["registered_drivers"],
        enrolled_drivers=billing["enrolled_drivers"],
        parkings_served=sessions["parkings_served"],
        open_sessions=sessions["open_now"],
        postpay_parkings=sessions["postpay_parkings"],
        charges_captured=billing["charges_captured"],
        captured_fen=billing["captured_fen"],
        charges_in_arrears=billing["charges_in_arrears"],
        arrears_fen=billing["arrears_fen"],
        parkings_today=lots["parkings_today"],
        growth=Growth(
            period_days=days,
            new_drivers=billing["new_drivers_since"],
            parkings=sessions["parkings_since"],
            captured_fen=billing["captured_fen_since"],
        ),
        by_district=[
            DistrictFigures.model_validate(d | billing["by_district"].get(d["district"], {}))
            for d in lots["by_district"]
        ],
        district_feeds=feeds,
    )


@router.get("/console", response_class=HTMLResponse, include_in_schema=False)
def console() -> HTMLResponse:
    """The ops console: a page over the admin API (the token stays in the browser)."""
    return HTMLResponse(CONSOLE.read_text(encoding="utf-8"))
