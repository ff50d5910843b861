"""Drivers: sign-in by one-time code, one bound payment account, registered vehicles.

Every change of what the gate needs to know is published as a full snapshot
(`citypark.account.updated`) through the outbox, with a version so that consumers keep
the newest one whatever the order of delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import timedelta

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.billing.charge.models import Charge, ChargeStatus
from services.billing.driver.models import (
    Driver,
    OtpChallenge,
    PaymentAccount,
    SmsMessage,
    Vehicle,
)
from services.billing.provider.port import PaymentProvider, ProviderTimeout, ProviderUnavailable
from shared import masking
from shared.bus.outbox import enqueue
from shared.errors import NotFound, Problem, RateLimited, UpstreamUnavailable, problem
from shared.events import AccountUpdated, EventType, PostpayStatus, VehicleRef, new_event
from shared.plates import normalize_plate, parse_plate_color
from shared.settings import Settings
from shared.timeutil import utcnow
from shared.topics import ACCOUNT_EVENTS

log = structlog.get_logger(__name__)
SOURCE = "billing"

PhoneInvalid = problem(422, "phone_invalid", "Not a mainland China mobile number")
OtpInvalid = problem(401, "otp_invalid", "The code is wrong, expired or already used")
OtpLocked = problem(429, "otp_attempts_exceeded", "Too many wrong codes; request a new one")
VehicleTaken = problem(409, "vehicle_taken", "Another driver holds this vehicle")
VehicleExists = problem(409, "vehicle_exists", "This vehicle is already on your account")
ProviderUnknown = problem(422, "provider_unknown", "Unknown payment provider")
AgreementInvalid = problem(
    422, "agreement_invalid", "The provider does not know this agreement or it is not active"
)
NoAccount = problem(404, "no_account", "No payment account is bound")

OTP_PER_HOUR = 5
PHONE_RE = re.compile(r"^(?:\+?86)?(1[3-9]\d{9})$")


def normalize_phone(raw: str) -> str:
    match = PHONE_RE.match(re.sub(r"[\s-]", "", raw))
    if not match:
        raise PhoneInvalid(f"{raw!r} is not an 11-digit mobile number starting with 1")
    return match.group(1)


def mask_phone(phone: str) -> str:
    return masking.mask_phone(phone)


def _hash_code(secret: str, phone: str, code: str) -> str:
    return hmac.new(secret.encode(), f"{phone}:{code}".encode(), hashlib.sha256).hexdigest()


def request_otp(db: Session, settings: Settings, raw_phone: str) -> None:
    phone = normalize_phone(raw_phone)
    since = utcnow() - timedelta(hours=1)
    recent = (
        db.scalar(
            select(func.count())
            .select_from(OtpChallenge)
            .where(OtpChallenge.phone == phone, OtpChallenge.created_at >= since)
        )
        or 0
    )
    if recent >= OTP_PER_HOUR:
        raise RateLimited(f"At most {OTP_PER_HOUR} codes per hour for one phone")
    code = f"{secrets.randbelow(1_000_000):06d}"
    secret = settings.jwt_secret.get_secret_value()
    db.add(
        OtpChallenge(
            phone=phone,
            code_hash=_hash_code(secret, phone, code),
            expires_at=utcnow() + timedelta(seconds=settings.otp_ttl_s),
        )
    )
    # The SMS port: in sandbox mode the message lands in the outbox admins can read.
    db.add(
        SmsMessage(
            phone=phone,
            body=f"【CityPark】验证码 {code}，{settings.otp_ttl_s // 60} "
            f"分钟内有效。Your CityPark code is {code}.",
        )
    )
    log.info("auth.otp_sent", phone=mask_phone(phone))


def verify_otp(db: Session, settings: Settings, raw_phone: str, code: str) -> Driver | Problem:
    """The driver, or the problem to answer with. A wrong code is *returned*, not raised, so
    that the request's transaction still commits the counted attempt."""
    phone = normalize_phone(raw_phone)
    challenge = db.scalar(
        select(OtpChallenge)
        .where(OtpChallenge.phone == phone)
        .order_by(OtpChallenge.created_at.desc())
        .limit(1)
    )
    now = utcnow()
    if challenge is None or challenge.used_at is not None or challenge.expires_at < now:
        return OtpInvalid()
    if challenge.attempts >= settings.otp_max_attempts:
        return OtpLocked()
    secret = settings.jwt_secret.get_secret_value()
    if not hmac.compare_digest(challenge.code_hash, _hash_code(secret, phone, code)):
        challenge.attempts += 1
        return OtpInvalid()
    challenge.used_at = now
    driver = db.scalar(select(Driver).where(Driver.phone == phone))
    if driver is None:
        driver = Driver(phone=phone)
        db.add(driver)
        db.flush()
        log.info("auth.driver_registered", driver_id=driver.id)
    return driver


def get_driver(db: Session, driver_id: str) -> Driver:
    driver = db.get(Driver, driver_id)
    if driver is None:
        raise NotFound("No such driver")
    return driver


def vehicles_of(db: Session, driver_id: str) -> list[Vehicle]:
    return list(
        db.scalars(
            select(Vehicle).where(Vehicle.driver_id == driver_id).order_by(Vehicle.created_at)
        )
    )


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


def publish_account_state(db: Session, settings: Settings, driver: Driver) -> None:
    driver.state_version += 1
    postpay = postpay_status(db, settings, driver.id)
    driver.postpay_published = postpay.value
    db.flush()
    data = AccountUpdated(
        driver_id=driver.id,
        version=driver.state_version,
        postpay=postpay,
        vehicles=[
            VehicleRef(plate=v.plate, plate_color=v.plate_color) for v in vehicles_of(db, driver.id)
        ],
    )
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


def add_vehicle(
    db: Session, settings: Settings, driver_id: str, plate_raw: str, color_raw: str
) -> Vehicle:
    plate = normalize_plate(plate_raw)
    color = parse_plate_color(color_raw).value
    holder = db.scalar(select(Vehicle).where(Vehicle.plate == plate, Vehicle.plate_color == color))
    if holder is not None:
        if holder.driver_id == driver_id:
            raise VehicleExists(f"{plate} is already registered to you")
        raise VehicleTaken(f"{plate} ({color}) is registered to another driver")
    vehicle = Vehicle(driver_id=driver_id, plate=plate, plate_color=color)
    db.add(vehicle)
    try:
        db.flush()
    except IntegrityError as exc:  # a concurrent registration won the race
        raise VehicleTaken(f"{plate} ({color}) is registered to another driver") from exc
    publish_account_state(db, settings, get_driver(db, driver_id))
    return vehicle


def remove_vehicle(db: Session, settings: Settings, driver_id: str, vehicle_id: str) -> None:
    vehicle = db.get(Vehicle, vehicle_id)
    if vehicle is None or vehicle.driver_id != driver_id:
        raise NotFound("No such vehicle")
    db.delete(vehicle)
    db.flush()
    publish_account_state(db, settings, get_driver(db, driver_id))


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


def sms_for(db: Session, phone: str) -> list[SmsMessage]:
    return list(
        db.scalars(
            select(SmsMessage)
            .where(SmsMessage.phone == normalize_phone(phone))
            .order_by(SmsMessage.sent_at.desc())
            .limit(50)
        )
    )
