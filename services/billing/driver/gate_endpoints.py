"""What the gateway needs to rebuild its gate state: every driver's last published snapshot.

Each item is exactly the `citypark.account.updated` payload of the driver's current
`state_version`, so the gateway applies it with the same newer-version-wins rule as the
events and a snapshot read here can never undo an event that is newer.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from sqlalchemy import func, select

from services.billing.driver import service as drivers
from services.billing.driver.models import Driver
from services.billing.vehicle.models import Vehicle, VehicleStatus
from shared.auth import InternalAuth
from shared.deps import DbSession
from shared.events import AccountUpdated, PostpayStatus, VehicleRef

internal = APIRouter(prefix="/internal/billing/gate", include_in_schema=False)


class AccountPage(BaseModel):
    items: list[AccountUpdated]
    # The last driver id of this page; pass it as `after` for the next one (null: the end).
    next: str | None
    # How many drivers there are in all; only on the first page (for progress).
    total: int | None = None


@internal.get("/accounts", response_model=AccountPage)
def accounts(
    _: InternalAuth,
    db: DbSession,
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> AccountPage:
    """Drivers in id order with their vehicles and post-pay state, as last published."""
    published = Driver.state_version > 0  # a driver never published has nothing for the gate
    page_filter = [published] if after is None else [published, Driver.id > after]
    page = (
        select(Driver.id, Driver.state_version, Driver.postpay_published)
        .where(*page_filter)
        .order_by(Driver.id)
        .limit(limit)
        .cte("page")
    )
    # One statement, so a driver's version and vehicles come from the same instant.
    rows = db.execute(
        select(
            page.c.id,
            page.c.state_version,
            page.c.postpay_published,
            Vehicle.plate,
            Vehicle.plate_color,
            Vehicle.status,
        )
        .outerjoin(
            Vehicle,
            (Vehicle.driver_id == page.c.id) & (Vehicle.status != VehicleStatus.superseded),
        )
        .order_by(page.c.id)
    ).all()
    items: dict[str, AccountUpdated] = {}
    for driver_id, version, postpay, plate, color, status in rows:
        item = items.get(driver_id)
        if item is None:
            if postpay is None:  # published before the state was recorded with the version
                postpay = drivers.postpay_status(db, request.app.state.settings, driver_id)
            item = items[driver_id] = AccountUpdated(
                driver_id=driver_id, version=version, postpay=PostpayStatus(postpay)
            )
        if plate is not None:
            item.vehicles.append(
                VehicleRef(
                    plate=plate, plate_color=color, verified=status == VehicleStatus.verified
                )
            )
    total = (
        db.scalar(select(func.count()).select_from(Driver).where(published))
        if after is None
        else None
    )
    for item in items.values():  # plates are encrypted in the database: ordered here
        item.vehicles.sort(key=lambda v: (v.plate, v.plate_color))
    last = next(reversed(items), None)
    return AccountPage(
        # Plates sealed as on the account topic: the rebuild reads the same form.
        items=[item.sealed(request.app.state.settings) for item in items.values()],
        next=last if len(items) == limit else None,
        total=total,
    )
