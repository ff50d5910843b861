"""Sign-in by one-time code.

A code is kept only as an HMAC (`billing_otp.code_hash`); its text leaves through the SMS port
and is stored nowhere outside sandbox mode. A challenge belongs to the address that asked for
it: its id begins with that address's keyed tag (`limits.origin_tag`), and a code is checked
only against the newest challenge the same address asked for. So a stranger can neither
replace nor lock someone else's code.

Every guess is counted by one atomic `UPDATE … SET attempts = attempts + 1 WHERE id = ? AND
attempts < max` before the code is compared: parallel guesses queue on the row (PostgreSQL's
row lock; SQLite's writers begin with `BEGIN IMMEDIATE`), so one code gets at most
`otp_max_attempts` comparisons however many guesses arrive at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import timedelta

import redis
import structlog
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.billing.driver.models import Driver, OtpChallenge, SmsMessage
from services.billing.driver.service import mask_phone, normalize_phone
from services.billing.signin import limits
from services.billing.signin.sms import SmsPort
from shared.errors import Problem, problem
from shared.keys import Purpose, derive
from shared.pii_columns import index_in
from shared.settings import Settings
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)

OtpInvalid = problem(401, "otp_invalid", "The code is wrong, expired or already used")
OtpLocked = problem(429, "otp_attempts_exceeded", "Too many wrong codes; request a new one")


def _secret(settings: Settings) -> str:
    return settings.jwt_secret.get_secret_value()


def _hash_code(secret: str, phone: str, code: str) -> str:
    """`secret` is the master secret; codes are hashed under its OTP key (shared/keys.py)."""
    key = derive(secret, Purpose.otp_hashes)
    return hmac.new(key, f"{phone}:{code}".encode(), hashlib.sha256).hexdigest()


def _challenge_id(origin: str) -> str:
    # 12 + 1 + 23 characters: the id column's 36, and 92 random bits stay unique.
    return f"{origin}.{uuid.uuid4().hex[:23]}"


def request_otp(
    db: Session, settings: Settings, r: redis.Redis, sms: SmsPort, raw_phone: str, address: str
) -> None:
    phone = normalize_phone(raw_phone)
    secret = _secret(settings)
    limits.allow_code(r, secret, phone, address)
    code = f"{secrets.randbelow(1_000_000):06d}"
    db.add(
        OtpChallenge(
            id=_challenge_id(limits.origin_tag(secret, address)),
            phone=phone,
            code_hash=_hash_code(secret, phone, code),
            expires_at=utcnow() + timedelta(seconds=settings.otp_ttl_s),
        )
    )
    sms.send(
        db,
        phone,
        f"【CityPark】验证码 {code}，{settings.otp_ttl_s // 60} 分钟内有效。"
        f"Your CityPark code is {code}.",
    )
    log.info("auth.otp_sent", phone=mask_phone(phone))


def verify_otp(
    db: Session, settings: Settings, raw_phone: str, code: str, address: str
) -> Driver | Problem:
    """The driver, or the problem to answer with. A wrong code is *returned*, not raised, so
    that the request's transaction still commits the counted attempt."""
    phone = normalize_phone(raw_phone)
    secret = _secret(settings)
    origin = limits.origin_tag(secret, address)
    challenge = db.scalar(
        select(OtpChallenge)
        .where(
            OtpChallenge.phone_bidx == index_in(db, "phone", phone),
            OtpChallenge.id.startswith(origin + "."),
        )
        .order_by(OtpChallenge.created_at.desc())
        .limit(1)
    )
    now = utcnow()
    if challenge is None or challenge.used_at is not None or challenge.expires_at < now:
        return OtpInvalid()
    # One guess, one attempt, taken atomically before the comparison.
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
        db.refresh(challenge)
        return OtpInvalid() if challenge.used_at is not None else OtpLocked()
    if not hmac.compare_digest(challenge.code_hash, _hash_code(secret, phone, code)):
        return OtpInvalid()
    used = db.execute(
        update(OtpChallenge)
        .where(OtpChallenge.id == challenge.id, OtpChallenge.used_at.is_(None))
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    if used.rowcount != 1:  # type: ignore[attr-defined]
        return OtpInvalid()
    driver = db.scalar(select(Driver).where(Driver.phone_bidx == index_in(db, "phone", phone)))
    if driver is not None:
        return driver
    try:
        with db.begin_nested():
            driver = Driver(phone=phone)
            db.add(driver)
            db.flush()
    except IntegrityError:  # signed in from two addresses at once: the other one registered
        return db.scalars(
            select(Driver).where(Driver.phone_bidx == index_in(db, "phone", phone))
        ).one()
    log.info("auth.driver_registered", driver_id=driver.id)
    return driver


def sms_for(db: Session, phone: str) -> list[SmsMessage]:
    return list(
        db.scalars(
            select(SmsMessage)
            .where(SmsMessage.phone_bidx == index_in(db, "phone", normalize_phone(phone)))
            .order_by(SmsMessage.sent_at.desc())
            .limit(50)
        )
    )
