"""Drivers: one bound payment account, registered vehicles (sign-in: `signin`).

Every change of what the gate needs to know is published as a full snapshot
(`citypark.account.updated`) through the outbox, with a version so that consumers keep
the newest one whatever the order of delivery.
"""

from __future__ import annotations

import re
from datetime import timedelta

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.billing.charge.models import Charge, ChargeStatus
from services.billing.driver.models import (
    Driver,
    PaymentAccount,
)
from services.billing.provider.port import PaymentProvider, ProviderTimeout, ProviderUnavailable
from services.billing.vehicle.models import Vehicle, VehicleStatus
from shared import masking
from shared.bus.outbox import enqueue
from shared.errors import NotFound, UpstreamUnavailable, problem
from shared.events import AccountUpdated, EventType, PostpayStatus, VehicleRef, new_event
from shared.settings import Settings
from shared.timeutil import utcnow
from shared.topics import ACCOUNT_EVENTS

log = structlog.get_logger(__name__)
SOURCE = "billing"

PhoneInvalid = problem(422, "phone_invalid", "Not a mainland China mobile number")
ProviderUnknown = problem(422, "provider_unknown", "Unknown payment provider")
AgreementInvalid = problem(
    422, "agreement_invalid", "The provider does not know this agreement or it is not active"
)
NoAccount = problem(404, "no_account", "No payment account is bound")

PHONE_RE = re.compile(r"^(?:\+?86)?(1[3-9]\d{9})$")


def normalize_phone(raw: str) -> str:
    match = PHONE_RE.match(re.sub(r"[\s-]", "", raw))
    if not match:
        raise PhoneInvalid(f"{raw!r} is not an 11-digit mobile number starting with 1")
    return match.group(1)


def mask_phone(phone: str) -> str:
    return masking.mask_phone(phone)


def get_driver(db: Session, driver_id: str) -> Driver:
    driver = db.get(Driver, driver_id)
    if driver is None:
        raise NotFound("No such driver")
    return driver


def arrears_fen(db: Session, driver_id: str) -> int:
    return (
        db.scalar(
            select(func.coalesce(func.sum(Charge.amount_fen), 0)).where(
                Charge.driver_id == driver_id, Charge.status == ChargeStatus.declined
            )
        )
        or 0
    )


def postpay_status(db: Session, settings: Settings, driver_id: str) -> PostpayStatus:
    if db.get(PaymentAccount, driver_id) is None:
        return PostpayStatus.no_account
    owed = arrears_fen(db, driver_id)
    if owed > settings.arrears_limit_fen:
        return PostpayStatus.suspended
    oldest = db.scalar(
        select(func.min(Charge.exited_at)).where(
            Charge.driver_id == driver_id, Charge.status == ChargeStatus.declined
        )
    )
    if oldest is not None and oldest < utcnow() - timedelta(days=settings.arrears_grace_days):
        return PostpayStatus.suspended
    return PostpayStatus.active


def gate_vehicles(db: Session, driver_id: str) -> list[VehicleRef]:
    """The driver's claims the gate must know: verified ones open post-pay, unverified ones
    make the gate say why not (`vehicle_unverified`); a superseded claim is no longer theirs."""
    claims = db.scalars(
        select(Vehicle).where(
            Vehicle.driver_id == driver_id, Vehicle.status != VehicleStatus.superseded
        )
    )
    # Sorted here: the database holds plates encrypted, so it cannot order by them.
    return sorted(
        (
            VehicleRef(
                plate=v.plate,
                plate_color=v.plate_color,
                verified=v.status == VehicleStatus.verified,
            )
            for v in claims
        ),
        key=lambda r: (r.plate, r.plate_color),
    )


def publish_account_state(db: Session, settings: Settings, driver: Driver) -> None:
    driver.state_version += 1
    postpay = postpay_status(db, settings, driver.id)
    driver.postpay_published = postpay.value
    db.flush()
    data = AccountUpdated(
        driver_id=driver.id,
        version=driver.state_version,
        postpay=postpay,
        vehicles=gate_vehicles(db, driver.id),
    ).sealed(settings)
    enqueue(
        db,
        source=SOURCE,
        topic=ACCOUNT_EVENTS,
        key=driver.id,
        event=new_event(EventType.account_updated, source=SOURCE, data=data, subject=driver.id),
    )


def refresh_account_state(db: Session, settings: Settings, driver: Driver) -> bool:
    """Publish the driver's state only if post-pay changed since the last snapshot: a capture
    that leaves arrears as they were tells the gate nothing new. True when published."""
    if postpay_status(db, settings, driver.id).value == driver.postpay_published:
        return False
    publish_account_state(db, settings, driver)
    return True


def bind_account(
    db: Session,
    settings: Settings,
    providers: dict[str, PaymentProvider],
    driver_id: str,
    provider_name: str,
    agreement_no: str,
) -> PaymentAccount:
    provider = providers.get(provider_name)
    if provider is None:
        raise ProviderUnknown(f"provider must be one of: {', '.join(sorted(providers))}")
    try:
        agreement = provider.get_agreement(agreement_no)
    except (ProviderTimeout, ProviderUnavailable) as exc:
        raise UpstreamUnavailable("The payment provider did not answer; try again") from exc
    if agreement is None or not agreement.active:
        raise AgreementInvalid(f"Agreement {agreement_no!r} is unknown or not active")
    account = db.get(PaymentAccount, driver_id)
    if account is None:
        account = PaymentAccount(
            driver_id=driver_id,
            provider=provider_name,
            agreement_no=agreement_no,
            masked_account=agreement.masked_account,
        )
        db.add(account)
    else:  # binding a new account replaces the old one
        account.provider = provider_name
        account.agreement_no = agreement_no
        account.masked_account = agreement.masked_account
        account.bound_at = utcnow()
    db.flush()
    publish_account_state(db, settings, get_driver(db, driver_id))
    log.info("account.bound", driver_id=driver_id, provider=provider_name)
    return account


def unbind_account(db: Session, settings: Settings, driver_id: str) -> None:
    account = db.get(PaymentAccount, driver_id)
    if account is None:
        raise NoAccount()
    db.delete(account)
    db.flush()
    publish_account_state(db, settings, get_driver(db, driver_id))
