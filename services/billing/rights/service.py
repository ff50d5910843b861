"""Drivers' rights: export what is held, erase the account, log out everywhere, new phone.

Erasure keeps the money: charges, refunds, invoices and the ledger stay (accounting rules keep
them ten years, `retention_money_years`), tied only to the driver's id, a random UUID that
nothing links to a person once the phone, the plates and the payment binding are gone. The
ledger is not touched, so it still balances. Per field (docs/privacy.md, "Drivers' rights"):

* driver: the phone is replaced by a random tombstone; `erased_at` and a token cut-off are set;
* vehicles, payment account, webhook, notification preferences, notifications and their
  deliveries, sign-in codes and SMS of the phone: deleted;
* charges: plate replaced by `ERASED_PLATE`, the payment agreement number dropped;
* invoices: a personal title (no tax id) becomes `PERSONAL_TITLE`; a company's title and tax
  id are the company's, not personal, and stay on the tax record; invoiced plates erased;
* disputes: the driver's free text is erased, the outcome and amounts stay;
* parkings (the sessions service): no driver link, the plate replaced by its pseudonym.

No network call is made while a write transaction is open (SQLite's one write lock).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import ColumnElement, delete, func, inspect, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from services.billing.charge.models import Charge, ChargeStatus
from services.billing.driver import service as drivers
from services.billing.driver.models import Driver, OtpChallenge, PaymentAccount, SmsMessage
from services.billing.invoice.models import Invoice, InvoiceItem
from services.billing.notification.models import Delivery, Notification, Preference, Webhook
from services.billing.refund.models import Dispute, Refund
from services.billing.signin import limits
from services.billing.signin.service import OtpInvalid, OtpLocked
from services.billing.signin.sms import SmsPort
from services.billing.vehicle import service as vehicles
from services.billing.vehicle.models import Vehicle, VehicleStatus
from shared import pii
from shared.db import transaction
from shared.errors import Problem, problem
from shared.keys import Purpose, derive
from shared.runtime import Runtime
from shared.settings import Settings
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)

AccountHasArrears = problem(
    409, "account_has_arrears", "Money is still owed or being taken; settle it first"
)
AccountHasOpenSessions = problem(
    409, "account_has_open_sessions", "A parking is still open; delete the account after it ends"
)
PhoneTaken = problem(409, "phone_taken", "Another driver signs in with this number")
PhoneUnchanged = problem(422, "phone_unchanged", "This is already the account's number")

ERASED_PLATE = "erased"
PERSONAL_TITLE = "个人"
# Money not settled yet: deleting now would leave a debt or a payment with no one to answer.
UNSETTLED = (
    ChargeStatus.declined,
    ChargeStatus.pending,
    ChargeStatus.unknown,
    ChargeStatus.parked,
)
# Phone-change challenges are told apart from sign-in ones by the separator after the origin
# tag (sign-in uses "."), so a phone-change code never signs anyone in and vice versa.
PHONE_CHANGE_SEP = ":"


def _phone_is(settings: Settings, model: Any, phone: str) -> ColumnElement[bool]:
    """`model.phone == phone`, or its blind index where phones are stored encrypted."""
    index = getattr(model, "phone_bidx", None)
    if index is not None:
        return index == pii.blind_index(settings, "phone", phone)  # type: ignore[no-any-return]
    return model.phone == phone  # type: ignore[no-any-return]


def driver_by_phone(db: Session, settings: Settings, phone: str) -> Driver | None:
    return db.scalar(select(Driver).where(_phone_is(settings, Driver, phone)))


def ms(at: Any) -> int:
    return int(at.timestamp() * 1000)


# --- export ---------------------------------------------------------------------------------


def _row(settings: Settings, obj: object, *, without: Iterable[str] = ()) -> dict[str, Any]:
    """A record's columns as they are held (blind indexes are keys, not data about anyone)."""
    skip = set(without)
    out: dict[str, Any] = {}
    for attr in inspect(obj).mapper.column_attrs:  # type: ignore[union-attr]
        if attr.key in skip or attr.key.endswith("_bidx"):
            continue
        value = getattr(obj, attr.key)
        if isinstance(value, str) and attr.key in ("phone", "plate"):
            value = pii.reveal(settings, value)
        out[attr.key] = value
    return out


def export(db: Session, rt: Runtime, driver_id: str) -> dict[str, Any]:
    s = rt.settings
    driver = drivers.get_driver(db, driver_id)
    mine = vehicles.vehicles_of(db, driver_id)
    charges = list(
        db.scalars(select(Charge).where(Charge.driver_id == driver_id).order_by(Charge.created_at))
    )
    charge_ids = [c.id for c in charges]
    invoices = list(
        db.scalars(
            select(Invoice).where(Invoice.driver_id == driver_id).order_by(Invoice.created_at)
        )
    )
    items: dict[str, list[dict[str, Any]]] = {}
    if invoices:
        for item in db.scalars(
            select(InvoiceItem).where(InvoiceItem.invoice_id.in_([i.id for i in invoices]))
        ):
            items.setdefault(item.invoice_id, []).append(_row(s, item))
    notes = list(
        db.scalars(
            select(Notification)
            .where(Notification.driver_id == driver_id)
            .order_by(Notification.created_at)
        )
    )
    deliveries: dict[str, list[dict[str, Any]]] = {}
    if notes:
        for d in db.scalars(
            select(Delivery).where(Delivery.notification_id.in_([n.id for n in notes]))
        ):
            # The target is the driver's own phone or webhook, both exported on their own.
            deliveries.setdefault(d.notification_id, []).append(
                _row(s, d, without=("target", "id", "notification_id"))
            )
    account = db.get(PaymentAccount, driver_id)
    preference = db.get(Preference, driver_id)
    hook = db.get(Webhook, driver_id)
    windows = vehicles.verified_windows(db, driver_id)
    verified = [
        {"plate": v.plate, "plate_color": v.plate_color}
        for v in mine
        if v.status == VehicleStatus.verified
    ]
    parkings = rt.internal("sessions").call(
        "POST",
        f"/internal/sessions/drivers/{driver_id}/export",
        json={"windows": [w.model_dump(mode="json") for w in windows]},
    )
    passes = (
        rt.internal("lots").call(
            "POST", "/internal/lots/passes/by-vehicles", json={"vehicles": verified}
        )
        if verified
        else []
    )
    return {
        "exported_at": utcnow(),
        "profile": {
            "id": driver.id,
            "phone": pii.reveal(s, driver.phone),
            "created_at": driver.created_at,
            "postpay": drivers.postpay_status(db, s, driver_id),
            "arrears_fen": drivers.arrears_fen(db, driver_id),
        },
        "payment_account": (
            {
                "provider": account.provider,
                "masked_account": account.masked_account,
                "bound_at": account.bound_at,
            }
            if account
            else None
        ),
        "vehicles": [_row(s, v, without=("driver_id",)) for v in mine],
        "parkings": parkings,
        # The agreement number is the provider's key to the bank account: shown masked above.
        "charges": [_row(s, c, without=("agreement_no",)) for c in charges],
        "refunds": [
            _row(s, r)
            for r in (
                db.scalars(select(Refund).where(Refund.charge_id.in_(charge_ids)))
                if charge_ids
                else []
            )
        ],
        "disputes": [
            _row(s, d) for d in db.scalars(select(Dispute).where(Dispute.driver_id == driver_id))
        ],
        "invoices": [_row(s, i) | {"items": items.get(i.id, [])} for i in invoices],
        "notifications": [
            _row(s, n, without=("dedupe_key",)) | {"deliveries": deliveries.get(n.id, [])}
            for n in notes
        ],
        "notification_preferences": preference.settings if preference else None,
        # The signing secret derives from the id and is never stored: nothing more to show.
        "webhook": (
            {"id": hook.id, "url": hook.url, "created_at": hook.created_at} if hook else None
        ),
        "passes": passes,
    }


# --- deletion -------------------------------------------------------------------------------


def refuse_if_owing(db: Session, driver_id: str) -> None:
    owing = db.scalar(
        select(func.count())
        .select_from(Charge)
        .where(Charge.driver_id == driver_id, Charge.status.in_([str(c) for c in UNSETTLED]))
    )
    if owing:
        raise AccountHasArrears(
            f"{owing} charge(s) are unpaid or still being taken; pay the arrears "
            "(POST /v1/me/arrears/payments) or wait for them to settle, then delete"
        )


def erase_parkings(rt: Runtime, driver_id: str) -> int:
    """The sessions service drops the driver link of every parking (idempotent)."""
    done = rt.internal("sessions").call("POST", f"/internal/sessions/drivers/{driver_id}/erase")
    return int(done["erased"])


def delete_driver(rt: Runtime, driver_id: str) -> None:
    """Erase the driver's personal data (see the module's doc); 409 while money is owed or a
    parking is open."""
    with rt.read_sessionmaker() as db, db.begin():  # a quick check; no lock while we ask
        drivers.get_driver(db, driver_id)
        refuse_if_owing(db, driver_id)
    sessions = rt.internal("sessions")
    open_now = sessions.call("GET", f"/internal/sessions/drivers/{driver_id}/open")
    if int(open_now["open"]):
        raise AccountHasOpenSessions(
            "The account can be deleted once the vehicle has left the car park"
        )
    now = utcnow()
    with transaction(rt.request_sessionmaker) as db:
        driver = drivers.get_driver(db, driver_id)
        refuse_if_owing(db, driver_id)  # again, inside the transaction that erases
        erase_billing(db, rt.settings, driver)
        driver.tokens_valid_after = now
        # The gate forgets the vehicles: the snapshot now holds none and no account.
        drivers.publish_account_state(db, rt.settings, driver)
    rt.driver_cutoffs.add(driver_id, ms(now))
    try:
        erase_parkings(rt, driver_id)
    except Exception as exc:  # the billing retention job asks again (`retry_parkings`)
        log.warning("rights.parkings_erase_deferred", driver_id=driver_id, error=repr(exc)[:200])
    log.info("rights.driver_erased", driver_id=driver_id)


def erase_billing(db: Session, settings: Settings, driver: Driver) -> None:
    phone = pii.reveal(settings, driver.phone)
    driver_id = driver.id
    db.execute(delete(OtpChallenge).where(_phone_is(settings, OtpChallenge, phone)))
    db.execute(delete(SmsMessage).where(_phone_is(settings, SmsMessage, phone)))
    db.execute(delete(Vehicle).where(Vehicle.driver_id == driver_id))
    db.execute(delete(PaymentAccount).where(PaymentAccount.driver_id == driver_id))
    db.execute(delete(Webhook).where(Webhook.driver_id == driver_id))
    db.execute(delete(Preference).where(Preference.driver_id == driver_id))
    note_ids = select(Notification.id).where(Notification.driver_id == driver_id)
    db.execute(delete(Delivery).where(Delivery.notification_id.in_(note_ids)))
    db.execute(delete(Notification).where(Notification.driver_id == driver_id))
    # ORM updates, so that encrypted columns and their indexes stay in step.
    for charge in db.scalars(select(Charge).where(Charge.driver_id == driver_id)):
        charge.plate = ERASED_PLATE
        charge.agreement_no = None
    invoice_ids = select(Invoice.id).where(Invoice.driver_id == driver_id)
    for item in db.scalars(select(InvoiceItem).where(InvoiceItem.invoice_id.in_(invoice_ids))):
        item.plate = ERASED_PLATE
    db.execute(
        update(Invoice)
        .where(Invoice.driver_id == driver_id, Invoice.tax_id.is_(None))
        .values(title=PERSONAL_TITLE)
        .execution_options(synchronize_session=False)
    )
    db.execute(
        update(Dispute)
        .where(Dispute.driver_id == driver_id)
        .values(reason="")
        .execution_options(synchronize_session=False)
    )
    # A random tombstone keeps the column unique and says nothing: signing in with the old
    # number finds no one, so it registers a new driver.
    driver.phone = f"erased:{secrets.token_hex(6)}"
    driver.erased_at = utcnow()
    db.flush()


# --- log out everywhere ---------------------------------------------------------------------


def logout_all(db: Session, rt: Runtime, driver_id: str) -> None:
    driver = drivers.get_driver(db, driver_id)
    now = utcnow()
    driver.tokens_valid_after = now
    db.flush()
    rt.driver_cutoffs.add(driver_id, ms(now))  # this process refuses them at once
    log.info("rights.logged_out_everywhere", driver_id=driver_id)


def table_cutoffs(
    factory: sessionmaker[Session], settings: Settings
) -> Callable[[], dict[str, int]]:
    """Cut-offs straight from billing's table (the process that serves billing). Only those
    younger than a driver token's lifetime matter: older tokens have expired anyway."""

    def fetch() -> dict[str, int]:
        return recent_cutoffs(factory, settings)

    return fetch


def recent_cutoffs(factory: sessionmaker[Session], settings: Settings) -> dict[str, int]:
    since = utcnow() - timedelta(seconds=settings.driver_token_ttl_s)
    with factory() as db, db.begin():
        rows = db.execute(
            select(Driver.id, Driver.tokens_valid_after).where(Driver.tokens_valid_after >= since)
        )
        return {driver_id: ms(at) for driver_id, at in rows}


# --- change of phone ------------------------------------------------------------------------


def _hash_code(secret: str, purpose: str, phone: str, code: str) -> str:
    """Codes are kept only as HMACs, under the OTP key; `purpose` keeps the old number's code
    and the new number's apart."""
    key = derive(secret, Purpose.otp_hashes)
    return hmac.new(key, f"{purpose}:{phone}:{code}".encode(), hashlib.sha256).hexdigest()


def _origin(settings: Settings, address: str) -> str:
    return limits.origin_tag(settings.jwt_secret.get_secret_value(), address)


def _taken(db: Session, settings: Settings, driver_id: str, phone: str) -> bool:
    holder = driver_by_phone(db, settings, phone)
    return holder is not None and holder.id != driver_id


def request_phone_change(
    db: Session,
    settings: Settings,
    cache: Any,
    sms: SmsPort,
    driver_id: str,
    raw_phone: str,
    address: str,
) -> None:
    new = drivers.normalize_phone(raw_phone)
    driver = drivers.get_driver(db, driver_id)
    old = pii.reveal(settings, driver.phone)
    if new == old:
        raise PhoneUnchanged()
    if _taken(db, settings, driver_id, new):
        raise PhoneTaken()
    secret = settings.jwt_secret.get_secret_value()
    origin = _origin(settings, address)
    for purpose, phone in (("old", old), ("new", new)):
        limits.allow_code(cache, secret, phone, address)
        code = f"{secrets.randbelow(1_000_000):06d}"
        db.add(
            OtpChallenge(
                id=f"{origin}{PHONE_CHANGE_SEP}{uuid.uuid4().hex[:23]}",
                phone=phone,
                code_hash=_hash_code(secret, f"{purpose}:{new}", phone, code),
                expires_at=utcnow() + timedelta(seconds=settings.otp_ttl_s),
            )
        )
        what = "更换手机号" if purpose == "new" else "将账户手机号更换为新号码"
        sms.send(
            db,
            phone,
            f"【CityPark】{what}验证码 {code}，{settings.otp_ttl_s // 60} 分钟内有效。"
            f"Your CityPark code to change the account's phone number is {code}.",
        )
    log.info("rights.phone_change_requested", driver_id=driver_id)


def _check(
    db: Session, settings: Settings, phone: str, purpose: str, code: str, origin: str
) -> Problem | OtpChallenge:
    """One guess at the newest phone-change challenge of `phone` from this address, counted
    before it is compared (as sign-in does); the challenge when right."""
    challenge = db.scalar(
        select(OtpChallenge)
        .where(
            _phone_is(settings, OtpChallenge, phone),
            OtpChallenge.id.startswith(origin + PHONE_CHANGE_SEP),
        )
        .order_by(OtpChallenge.created_at.desc())
        .limit(1)
    )
    if challenge is None or challenge.used_at is not None or challenge.expires_at < utcnow():
        return OtpInvalid()
    counted = db.execute(
        update(OtpChallenge)
        .where(
            OtpChallenge.id == challenge.id,
            OtpChallenge.attempts < settings.otp_max_attempts,
            OtpChallenge.used_at.is_(None),
        )
        .values(attempts=OtpChallenge.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    if counted.rowcount != 1:  # type: ignore[attr-defined]
        return OtpLocked()
    expected = _hash_code(settings.jwt_secret.get_secret_value(), purpose, phone, code)
    if not hmac.compare_digest(challenge.code_hash, expected):
        return OtpInvalid()
    return challenge


def confirm_phone_change(
    db: Session,
    settings: Settings,
    driver_id: str,
    raw_phone: str,
    code_old: str,
    code_new: str,
    address: str,
) -> Driver | Problem:
    """The driver with the new number, or the problem to answer with (returned, not raised, so
    that the counted attempts commit)."""
    new = drivers.normalize_phone(raw_phone)
    driver = drivers.get_driver(db, driver_id)
    old = pii.reveal(settings, driver.phone)
    origin = _origin(settings, address)
    checked = [
        _check(db, settings, old, f"old:{new}", code_old, origin),
        _check(db, settings, new, f"new:{new}", code_new, origin),
    ]
    for outcome in checked:
        if isinstance(outcome, Problem):
            return outcome  # a right code stays usable with the other one's retry
    if _taken(db, settings, driver_id, new):
        return PhoneTaken()
    for outcome in checked:
        outcome.used_at = utcnow()  # type: ignore[union-attr]
    try:
        with db.begin_nested():
            driver.phone = new
            db.flush()
    except IntegrityError:  # another driver registered the number meanwhile
        return PhoneTaken()
    log.info("rights.phone_changed", driver_id=driver_id)
    return driver
