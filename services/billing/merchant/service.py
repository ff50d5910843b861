"""Merchant validation (商户优惠/停车券): a merchant at a car park takes minutes or an amount off
a customer's parking, or makes it free, while the car is still inside.

A validation is recorded `pending` on the vehicle's open session (which the sessions service
owns and answers on its internal API). When the session closes, billing prices the stay and
applies the pending validations to that price, in a fixed order:

1. `minutes`, oldest first: the billed stay ends that many minutes earlier (never before the
   entry) and is priced again with the same tariff by the lots service, so the fee is exactly
   what SPEC §8 says for the shortened stay;
2. `amount`, oldest first: that many fen off what is left, never below 0;
3. `full`: whatever is left.

Each validation records what it took off (`applied_fen`), and that is what its merchant owes:
one `merchant_validation` journal per validation, Dr `asset:merchant_receivable:<merchant>`,
Cr `liability:validations_deferred:<operator>` (docs/billing.md, "Merchant validation").
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import secrets
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from services.billing.charge.models import Charge, ChargeStatus
from services.billing.ledger import service as ledger
from services.billing.ledger.models import Journal, LedgerEntry
from services.billing.merchant.models import (
    Merchant,
    Validation,
    ValidationKind,
    ValidationStatus,
)
from services.billing.merchant.schemas import (
    MerchantCreate,
    Statement,
    StatementLine,
    ValidationCreate,
)
from shared.errors import NotFound, problem
from shared.internal import InternalClient
from shared.plates import mask_plate, normalize_plate, parse_plate_color
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)
SHANGHAI = ZoneInfo("Asia/Shanghai")
KEY_PREFIX = "cpm_"
MONTH = re.compile(r"(\d{4})-(\d{2})")

LotUnknown = problem(404, "lot_unknown", "No such car park")
ApiKeyInvalid = problem(401, "api_key_invalid", "The merchant API key is missing or not valid")
NoOpenSession = problem(
    409, "no_open_session", "This vehicle has no open parking at the merchant's car park"
)
SessionLimitReached = problem(
    409, "session_validation_limit", "This merchant has already validated this parking"
)
DailyLimitReached = problem(
    409, "merchant_daily_limit", "This merchant's validations for today are used up"
)
ValidationNotPending = problem(
    409, "validation_not_pending", "Only a validation on a parking still open can be undone"
)
MonthInvalid = problem(422, "month_invalid", "The month must be YYYY-MM")


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def _is_postgres(db: Session) -> bool:
    return db.get_bind().dialect.name == "postgresql"


# --- merchants ---------------------------------------------------------------------------


def create_merchant(
    db: Session, lots: InternalClient, data: MerchantCreate
) -> tuple[Merchant, str]:
    """Register a merchant at a car park; returns it with its API key (shown this once)."""
    lot_id = str(data.lot_id)
    now = utcnow()
    try:
        # A zero-length stay: lots answers for any lot it knows, and 404 for one it does not.
        lots.call(
            "POST",
            f"/internal/lots/{lot_id}/price",
            json={"lot_id": lot_id, "entered_at": now.isoformat(), "exited_at": now.isoformat()},
        )
    except NotFound as exc:
        raise LotUnknown(f"No car park {lot_id}") from exc
    api_key = _new_key()
    merchant = Merchant(
        lot_id=lot_id,
        name=data.name,
        key_hash=hash_key(api_key),
        key_prefix=api_key[:12],
        per_session_limit=data.per_session_limit,
        daily_limit=data.daily_limit,
    )
    db.add(merchant)
    db.flush()
    log.info("merchant.created", merchant_id=merchant.id, lot_id=lot_id)
    return merchant, api_key


def _new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def rotate_key(db: Session, merchant: Merchant) -> str:
    """A new API key for the merchant, shown this once; the old one stops working at once (a
    leaked key is rotated to shut it out, so there is no overlap)."""
    api_key = _new_key()
    merchant.key_hash, merchant.key_prefix = hash_key(api_key), api_key[:12]
    db.flush()
    log.info("merchant.key_rotated", merchant_id=merchant.id, key_prefix=merchant.key_prefix)
    return api_key


def merchants_at(db: Session, lot_id: str | None, limit: int = 100) -> list[Merchant]:
    query = select(Merchant).order_by(Merchant.created_at.desc()).limit(limit)
    if lot_id:
        query = query.where(Merchant.lot_id == lot_id)
    return list(db.scalars(query))


def get_merchant(db: Session, merchant_id: str) -> Merchant:
    merchant = db.get(Merchant, merchant_id)
    if merchant is None:
        raise NotFound("No such merchant")
    return merchant


def authenticate(db: Session, api_key: str) -> Merchant:
    merchant = db.scalar(select(Merchant).where(Merchant.key_hash == hash_key(api_key)))
    if merchant is None:
        raise ApiKeyInvalid()
    return merchant


# --- validations -------------------------------------------------------------------------


def _day_bounds(at: datetime) -> tuple[datetime, datetime]:
    day = at.astimezone(SHANGHAI).date()
    start = datetime.combine(day, time(), tzinfo=SHANGHAI)
    return start, start + timedelta(days=1)


def validate(
    db: Session, sessions: InternalClient, merchant: Merchant, data: ValidationCreate
) -> Validation:
    """Validate the vehicle's open parking at the merchant's car park."""
    plate = normalize_plate(data.plate)
    color = parse_plate_color(data.plate_color).value
    query = urlencode({"lot_id": merchant.lot_id, "plate": plate, "plate_color": color})
    try:
        session: dict[str, Any] = sessions.call("GET", f"/internal/sessions/open?{query}")
    except NotFound as exc:
        raise NoOpenSession(f"No open parking of {mask_plate(plate)} at this car park") from exc
    session_id = str(session["id"])
    # The sessions service may still list it open while billing already priced its exit.
    if db.scalar(select(Charge.id).where(Charge.session_id == session_id)) is not None:
        raise NoOpenSession(f"The parking of {mask_plate(plate)} has just ended")
    if _is_postgres(db):
        # One merchant's validations queue here, so two at once cannot both pass a limit.
        db.execute(select(Merchant.id).where(Merchant.id == merchant.id).with_for_update())
    given = (
        select(func.count())
        .select_from(Validation)
        .where(
            Validation.merchant_id == merchant.id,
            Validation.status != ValidationStatus.cancelled,
        )
    )
    on_session = db.scalar(given.where(Validation.session_id == session_id)) or 0
    if on_session >= merchant.per_session_limit:
        raise SessionLimitReached(
            f"{on_session} of {merchant.per_session_limit} validations on this parking used"
        )
    start, end = _day_bounds(utcnow())
    today = db.scalar(given.where(Validation.created_at >= start, Validation.created_at < end)) or 0
    if today >= merchant.daily_limit:
        raise DailyLimitReached(f"{today} of {merchant.daily_limit} validations today used")
    validation = Validation(
        merchant_id=merchant.id,
        lot_id=merchant.lot_id,
        session_id=session_id,
        plate=plate,
        plate_color=color,
        kind=data.kind,
        value=data.value,
    )
    db.add(validation)
    db.flush()
    log.info(
        "validation.created",
        validation_id=validation.id,
        merchant_id=merchant.id,
        session_id=session_id,
        kind=data.kind.value,
        value=data.value,
    )
    return validation


def validations_of(
    db: Session, merchant_id: str, status: ValidationStatus | None = None, limit: int = 100
) -> list[Validation]:
    query = (
        select(Validation)
        .where(Validation.merchant_id == merchant_id)
        .order_by(Validation.created_at.desc(), Validation.id)
        .limit(limit)
    )
    if status is not None:
        query = query.where(Validation.status == status)
    return list(db.scalars(query))


def get_validation(db: Session, merchant_id: str, validation_id: str) -> Validation:
    validation = db.get(Validation, validation_id)
    # Another merchant's validation is indistinguishable from a missing one.
    if validation is None or validation.merchant_id != merchant_id:
        raise NotFound("No such validation")
    return validation


def cancel(db: Session, merchant_id: str, validation_id: str) -> Validation:
    """Undo a validation while its parking is still open."""
    query = select(Validation).where(
        Validation.id == validation_id, Validation.merchant_id == merchant_id
    )
    if _is_postgres(db):
        # Waits for a concurrent billing of the session, then sees the validation applied.
        query = query.with_for_update()
    validation = db.scalar(query)
    if validation is None:
        raise NotFound("No such validation")
    if validation.status != ValidationStatus.pending:
        raise ValidationNotPending(f"The validation is {validation.status}")
    validation.status = ValidationStatus.cancelled
    validation.cancelled_at = utcnow()
    db.flush()
    log.info("validation.cancelled", validation_id=validation.id, merchant_id=merchant_id)
    return validation


def lapse(db: Session, session_id: str) -> None:
    """The session closed without a post-pay charge: its validations have nothing to lower."""
    db.execute(
        update(Validation)
        .where(Validation.session_id == session_id, Validation.status == ValidationStatus.pending)
        .values(status=ValidationStatus.lapsed)
    )


def _pending_in_order(db: Session, session_id: str) -> list[Validation]:
    query = (
        select(Validation)
        .where(Validation.session_id == session_id, Validation.status == ValidationStatus.pending)
        .order_by(Validation.created_at, Validation.id)
    )
    if _is_postgres(db):
        query = query.with_for_update()
    found = list(db.scalars(query))
    order = [ValidationKind.minutes, ValidationKind.amount, ValidationKind.full]
    return sorted(found, key=lambda v: order.index(ValidationKind(v.kind)))  # stable


def apply_validations(
    db: Session, lots: InternalClient, charge: Charge, price_request: dict[str, Any]
) -> list[Validation]:
    """Lower a freshly priced charge by its session's pending validations (module docstring)
    and book what each merchant owes. `price_request` is the body the stay was priced with."""
    pending = _pending_in_order(db, charge.session_id)
    if not pending:
        return []
    gross = charge.amount_fen
    fee = gross
    lines: list[dict[str, Any]] = list(charge.breakdown.get("lines", []))
    minutes_off = 0
    billed_exit: datetime | None = None
    now = utcnow()
    for v in pending:
        before = fee
        if v.kind == ValidationKind.minutes:
            minutes_off += v.value
            if fee > 0:
                billed_exit = max(
                    charge.entered_at, charge.exited_at - timedelta(minutes=minutes_off)
                )
                answer: dict[str, Any] = lots.call(
                    "POST",
                    f"/internal/lots/{charge.lot_id}/price",
                    json={**price_request, "exited_at": billed_exit.isoformat()},
                )
                # A shorter stay never costs more than the longer one did, whatever the tariff.
                fee = min(fee, int(answer["fee_fen"]))
                lines = list(answer["breakdown"])
        elif v.kind == ValidationKind.amount:
            fee = max(0, fee - v.value)
        else:
            fee = 0
        v.applied_fen = before - fee
        v.status = ValidationStatus.applied
        v.charge_id = charge.id
        v.applied_at = now
        if v.applied_fen:
            ledger.post(
                db,
                kind=ledger.JournalKind.merchant_validation,
                ref_type="validation",
                ref_id=v.id,
                at=now,
                lines=[
                    (ledger.merchant_receivable(v.merchant_id), v.applied_fen),
                    (ledger.validations_deferred(charge.operator_id), -v.applied_fen),
                ],
            )
    charge.amount_fen = fee
    charge.validated_fen = gross - fee
    charge.breakdown = {
        "lines": lines,
        "gross_fen": gross,
        "validated_fen": gross - fee,
        "billed_exited_at": billed_exit.isoformat() if billed_exit else None,
        "validations": [
            {
                "id": v.id,
                "merchant_id": v.merchant_id,
                "kind": v.kind,
                "value": v.value,
                "applied_fen": v.applied_fen,
            }
            for v in pending
        ],
    }
    if fee == 0:
        charge.status = ChargeStatus.free
    db.flush()
    log.info(
        "validations.applied",
        charge_id=charge.id,
        validations=len(pending),
        gross_fen=gross,
        amount_fen=fee,
    )
    return pending


# --- statements --------------------------------------------------------------------------


def parse_month(month: str) -> tuple[date, date]:
    """`YYYY-MM` → (first day, first day of the next month)."""
    match = MONTH.fullmatch(month)
    if match is None or not 1 <= int(match[2]) <= 12 or int(match[1]) < 2000:
        raise MonthInvalid(f"{month!r} is not a month like 2026-03")
    first = date(int(match[1]), int(match[2]), 1)
    following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first, following


def statement(db: Session, merchant: Merchant, month: str) -> Statement:
    """What the merchant gave in one Asia/Shanghai month, validation by validation."""
    first, following = parse_month(month)
    start = datetime.combine(first, time(), tzinfo=SHANGHAI)
    end = datetime.combine(following, time(), tzinfo=SHANGHAI)
    rows: Sequence[Validation] = db.scalars(
        select(Validation)
        .where(
            Validation.merchant_id == merchant.id,
            Validation.status == ValidationStatus.applied,
            Validation.applied_at >= start,
            Validation.applied_at < end,
        )
        .order_by(Validation.applied_at, Validation.id)
    ).all()
    lines = [
        StatementLine(
            validation_id=v.id,
            applied_at=v.applied_at or v.created_at,
            session_id=v.session_id,
            charge_id=v.charge_id,
            plate=mask_plate(v.plate),
            kind=v.kind,
            value=v.value,
            applied_fen=v.applied_fen or 0,
        )
        for v in rows
    ]
    return Statement(
        merchant_id=merchant.id,
        merchant_name=merchant.name,
        month=month,
        validations=len(lines),
        total_fen=sum(line.applied_fen for line in lines),
        lines=lines,
    )


def ledger_owed(db: Session, merchant_id: str, month: str) -> int:
    """What the ledger says the merchant came to owe in the month (the statement's check)."""
    first, following = parse_month(month)
    return int(
        db.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount_fen), 0))
            .join(Journal, Journal.id == LedgerEntry.journal_id)
            .where(
                LedgerEntry.account == ledger.merchant_receivable(merchant_id),
                Journal.kind == ledger.JournalKind.merchant_validation,
                Journal.business_date >= first,
                Journal.business_date < following,
            )
        )
        or 0
    )


CSV_COLUMNS = [
    "applied_at",
    "validation_id",
    "session_id",
    "charge_id",
    "plate",
    "kind",
    "value",
    "applied_fen",
]


def to_csv(result: Statement) -> str:
    """One row per validation (times in Asia/Shanghai), then a `total` row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for line in result.lines:
        writer.writerow(
            [
                line.applied_at.astimezone(SHANGHAI).isoformat(),
                line.validation_id,
                line.session_id,
                line.charge_id or "",
                line.plate,
                line.kind,
                line.value,
                line.applied_fen,
            ]
        )
    writer.writerow(["total", "", "", "", "", "", result.validations, result.total_fen])
    return buffer.getvalue()
