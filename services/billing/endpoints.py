"""HTTP of billing: driver profile, account, vehicles, charges, arrears; admin (sign-in:
`signin`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status

from services.billing.charge import service as charges
from services.billing.charge.models import Charge
from services.billing.charge.schemas import (
    ArrearsOut,
    ChargeDetail,
    ChargeOut,
    DriverArrears,
    LedgerCheck,
)
from services.billing.driver import service as drivers
from services.billing.driver.models import PaymentAccount
from services.billing.driver.schemas import (
    AccountBind,
    AccountOut,
    MeOut,
)
from services.billing.ledger import service as ledger
from services.billing.provider.port import PaymentProvider
from services.billing.refund import service as refunds
from services.billing.refund.endpoints import dispute_out
from services.billing.vehicle import service as vehicles
from services.billing.vehicle.schemas import VehicleOut
from shared.auth import (
    DriverAuth,
    FinanceAuth,
    InternalAuth,
)
from shared.deps import DbSession
from shared.errors import NotFound
from shared.http import problem_responses
from shared.masking import UNMASK_RESPONSES, View, staff_view
from shared.plates import mask_plate
from shared.settings import Settings

me = APIRouter(prefix="/v1/me", tags=["driver: account"])
admin = APIRouter(prefix="/v1/admin", tags=["admin: billing"])
internal = APIRouter(prefix="/internal/billing", include_in_schema=False)


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _providers(request: Request) -> dict[str, PaymentProvider]:
    return request.app.state.runtime.providers  # type: ignore[no-any-return]


def _charge_out(c: Charge) -> ChargeOut:
    out = ChargeOut.model_validate(c, from_attributes=True)
    out.plate = mask_plate(out.plate)
    return out


@me.get("", response_model=MeOut)
def get_me(who: DriverAuth, db: DbSession, request: Request) -> MeOut:
    """The driver's profile: masked phone, bound account, vehicles, post-pay state, arrears."""
    driver = drivers.get_driver(db, who.id)
    account = db.get(PaymentAccount, who.id)
    return MeOut(
        id=driver.id,
        phone=drivers.mask_phone(driver.phone),
        account=AccountOut.model_validate(account, from_attributes=True) if account else None,
        vehicles=[
            VehicleOut.model_validate(v, from_attributes=True)
            for v in vehicles.vehicles_of(db, who.id)
        ],
        postpay=drivers.postpay_status(db, _settings(request), who.id),
        arrears_fen=drivers.arrears_fen(db, who.id),
    )


@me.put(
    "/account",
    response_model=AccountOut,
    responses=problem_responses(drivers.ProviderUnknown, drivers.AgreementInvalid),
)
def bind_account(data: AccountBind, who: DriverAuth, db: DbSession, request: Request) -> AccountOut:
    """Bind the one payment account (a provider's withholding agreement); replaces the old."""
    account = drivers.bind_account(
        db, _settings(request), _providers(request), who.id, data.provider, data.agreement_no
    )
    return AccountOut.model_validate(account, from_attributes=True)


@me.delete(
    "/account",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(drivers.NoAccount),
)
def unbind_account(who: DriverAuth, db: DbSession, request: Request) -> Response:
    drivers.unbind_account(db, _settings(request), who.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@me.get("/charges", response_model=list[ChargeOut])
def list_charges(
    who: DriverAuth, db: DbSession, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> list[ChargeOut]:
    """What each parking cost and whether it was taken from the bound account."""
    return [_charge_out(c) for c in charges.charges_of(db, who.id, limit)]


@me.get("/charges/{charge_id}", response_model=ChargeDetail, responses=problem_responses(NotFound))
def get_charge(charge_id: str, who: DriverAuth, db: DbSession) -> ChargeDetail:
    """One charge, with what was refunded and the outcome of its disputes."""
    charge = charges.get_charge_for(db, who.id, charge_id)
    out = ChargeDetail.model_validate(_charge_out(charge).model_dump())
    out.disputes = [dispute_out(db, d) for d in refunds.disputes_of_charge(db, charge.id)]
    return out


@me.get("/arrears", response_model=ArrearsOut)
def arrears(who: DriverAuth, db: DbSession) -> ArrearsOut:
    owed = charges.arrears_of(db, who.id)
    return ArrearsOut(
        arrears_fen=sum(c.amount_fen for c in owed), charges=[_charge_out(c) for c in owed]
    )


@me.post(
    "/arrears/payments",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ArrearsOut,
    responses=problem_responses(drivers.NoAccount),
)
def pay_arrears(who: DriverAuth, db: DbSession) -> ArrearsOut:
    """Charge all arrears to the bound account now; results show on the charges shortly."""
    owed = charges.pay_arrears(db, who.id)
    return ArrearsOut(
        arrears_fen=sum(c.amount_fen for c in owed), charges=[_charge_out(c) for c in owed]
    )


@admin.get(
    "/arrears",
    response_model=list[DriverArrears],
    responses={**problem_responses(drivers.PhoneInvalid), **UNMASK_RESPONSES},
)
def search_arrears(
    view: Annotated[View, Depends(staff_view("billing", "arrears"))],
    db: DbSession,
    phone: str | None = None,
    driver_id: str | None = None,
    min_fen: Annotated[int, Query(ge=0)] = 0,
    older_than_days: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[DriverArrears]:
    """Drivers who owe money, biggest first; search by phone, driver, amount or age. Phones
    are masked unless an admin asks `unmasked=true` with a `reason` (audited); searching by
    phone is such a look-up."""
    if phone:
        view.require_lookup("phone")
    return [
        DriverArrears.model_validate(row | {"phone": view.phone(row["phone"])})
        for row in charges.search_arrears(
            db,
            phone=phone,
            driver_id=driver_id,
            min_fen=min_fen,
            older_than_days=older_than_days,
            limit=limit,
        )
    ]


@admin.get("/ledger/check", response_model=LedgerCheck)
def ledger_check(_: FinanceAuth, db: DbSession) -> LedgerCheck:
    """Is every journal balanced and does the whole ledger sum to zero?"""
    balanced, total, journals, unbalanced = ledger.check(db)
    return LedgerCheck(
        balanced=balanced, sum_fen=total, journals=journals, unbalanced_journals=unbalanced
    )


@internal.get("/stats")
def stats(_: InternalAuth, db: DbSession, since: datetime) -> dict[str, Any]:
    return charges.stats(db, since)
