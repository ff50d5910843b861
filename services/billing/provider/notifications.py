"""Asynchronous notifications from a provider: verified, deduplicated, applied under the same
row locks as the synchronous path, so the order of the two never matters."""

from __future__ import annotations

from datetime import datetime

import structlog
from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.billing.charge import service as charges
from services.billing.charge.models import Charge
from services.billing.provider.port import ChargeResult, Outcome, PaymentProvider, RefundResult
from services.billing.refund import service as refunds
from services.billing.refund.models import Refund
from shared.bus.consumer import first_time
from shared.errors import ValidationFailed, problem
from shared.settings import Settings

log = structlog.get_logger(__name__)

SignatureInvalid = problem(
    401, "notification_signature_invalid", "The notification's signature does not verify"
)
ProviderUnknown = problem(404, "provider_unknown", "Unknown payment provider")


class Notice(BaseModel):
    notify_id: str
    kind: str  # charge | refund
    out_trade_no: str
    out_refund_no: str | None = None
    trade_no: str | None = None
    amount_fen: int
    status: str
    occurred_at: datetime


def verify(provider: PaymentProvider | None, body: bytes, signature: str | None) -> Notice:
    if provider is None:
        raise ProviderUnknown()
    if not provider.verify_notification(body, signature):
        raise SignatureInvalid("Missing, wrong or older than 300 s")
    try:
        return Notice.model_validate_json(body)
    except ValidationError as exc:
        raise ValidationFailed(f"Not a notification: {exc.error_count()} errors") from exc


def _locked(db: Session, model: type[Charge] | type[Refund], key: str) -> Charge | Refund | None:
    query = select(model).where(model.id == key)
    if db.get_bind().dialect.name == "postgresql":
        # Waits for a worker that is talking to the provider about the same row right now.
        query = query.with_for_update()
    return db.scalar(query)


def apply(db: Session, settings: Settings, provider: str, notice: Notice) -> str:
    """What the notice did: `applied`, `duplicate`, `already_known` or `ignored`."""
    if not first_time(db, f"notify:{provider}", notice.notify_id):
        return "duplicate"
    if notice.kind == "charge":
        charge = _locked(db, Charge, notice.out_trade_no)
        if not isinstance(charge, Charge) or charge.amount_fen != notice.amount_fen:
            # Not ours, or not what we asked: reconciliation reports it, nothing is booked.
            log.warning("notify.ignored", notify_id=notice.notify_id, ref=notice.out_trade_no)
            return "ignored"
        result = ChargeResult(
            Outcome.captured if notice.status == "captured" else Outcome.declined,
            notice.trade_no,
            None,
            notice.occurred_at,
        )
        done = charges.apply_notice(db, settings, charge, result)
    elif notice.kind == "refund" and notice.out_refund_no:
        refund = _locked(db, Refund, notice.out_refund_no)
        if not isinstance(refund, Refund) or notice.status != "succeeded":
            log.warning("notify.ignored", notify_id=notice.notify_id, ref=notice.out_refund_no)
            return "ignored"
        done = refunds.apply_notice(
            db, refund, RefundResult(refund.id, notice.amount_fen, notice.occurred_at)
        )
    else:
        return "ignored"
    log.info("notify.received", notify_id=notice.notify_id, kind=notice.kind, applied=done)
    return "applied" if done else "already_known"
