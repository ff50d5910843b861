"""Disputes: drivers raise them on a charge, finance decides (refund in full or part, or reject)."""

from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy.orm import Session

from services.billing.refund import service as refunds
from services.billing.refund.models import Dispute, Refund
from services.billing.refund.schemas import DisputeCreate, DisputeDecision, DisputeOut, RefundOut
from shared import audit
from shared.auth import DriverAuth, FinanceAuth
from shared.deps import DbSession
from shared.errors import NotFound
from shared.http import problem_responses

me = APIRouter(prefix="/v1/me", tags=["driver: account"])
admin = APIRouter(prefix="/v1/admin", tags=["admin: billing"])


def dispute_out(db: Session, d: Dispute) -> DisputeOut:
    refund = db.get(Refund, d.refund_id) if d.refund_id else None
    out = DisputeOut.model_validate(d, from_attributes=True)
    out.refund = RefundOut.model_validate(refund, from_attributes=True) if refund else None
    return out


@me.post(
    "/charges/{charge_id}/disputes",
    status_code=status.HTTP_201_CREATED,
    response_model=DisputeOut,
    responses=problem_responses(NotFound, refunds.ChargeNotDisputable, refunds.DisputeAlreadyOpen),
)
def open_dispute(charge_id: str, data: DisputeCreate, who: DriverAuth, db: DbSession) -> DisputeOut:
    """Dispute a captured charge with a reason; finance answers with a refund or a rejection."""
    return dispute_out(db, refunds.open_dispute(db, who.id, charge_id, data.reason))


@admin.post(
    "/disputes/{dispute_id}/decision",
    response_model=DisputeOut,
    responses=problem_responses(NotFound, refunds.DisputeDecided, refunds.RefundExceedsCaptured),
)
def decide(dispute_id: str, data: DisputeDecision, who: FinanceAuth, db: DbSession) -> DisputeOut:
    """Refund (all that is left, or `amount_fen`) or reject. The refund goes through the
    provider right after; the dispute shows `refund_pending`, then `refunded`. Audited."""
    dispute = refunds.decide(db, dispute_id, who.id, data.outcome, data.amount_fen)
    audit.record(
        db,
        who,
        service="billing",
        action="dispute.decide",
        entity="dispute",
        entity_id=dispute.id,
        before={"status": "open"},  # only an open dispute can be decided
        after={
            "status": dispute.status,
            "outcome": dispute.outcome,
            "charge_id": dispute.charge_id,
            "amount_fen": dispute.amount_fen,
            "refund_id": dispute.refund_id,
        },
    )
    return dispute_out(db, dispute)
