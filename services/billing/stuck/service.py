"""What is parked, and putting it back. Parking itself happens in each queue's worker
(charge, refund and notification services), under the shared failure policy."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.billing.charge import service as charges
from services.billing.charge.models import Charge, ChargeStatus
from services.billing.notification import service as notifications
from services.billing.notification.models import Delivery, DeliveryStatus
from services.billing.refund import service as refunds
from services.billing.refund.models import Refund, RefundStatus
from services.billing.stuck.schemas import ParkedItem, ParkedKind, ParkedOut
from shared.timeutil import utcnow


def parked(db: Session, limit: int = 200) -> ParkedOut:
    items = [
        ParkedItem(
            kind=ParkedKind.charge,
            id=c.id,
            detail=c.failure_code or "",
            attempts=c.attempts,
            since=c.updated_at,
        )
        for c in charges.parked(db, limit)
    ]
    items += [
        ParkedItem(
            kind=ParkedKind.refund,
            id=r.id,
            detail=r.failure_code or "",
            attempts=r.attempts,
            since=r.next_attempt_at,
        )
        for r in db.scalars(select(Refund).where(Refund.status == RefundStatus.parked).limit(limit))
    ]
    items += [
        ParkedItem(
            kind=ParkedKind.notification,
            id=d.id,
            detail=d.last_error or "",
            attempts=d.attempts,
            since=d.next_attempt_at,
        )
        for d in db.scalars(
            select(Delivery).where(Delivery.status == DeliveryStatus.parked).limit(limit)
        )
    ]
    now = utcnow()

    def due(model: type, status: object, *statuses: object) -> int:
        return int(
            db.scalar(
                select(func.count())
                .select_from(model)
                .where(model.status.in_([status, *statuses]), model.next_attempt_at <= now)  # type: ignore[attr-defined]
            )
            or 0
        )

    return ParkedOut(
        items=items,
        due_backlog={
            "charges": due(Charge, ChargeStatus.pending, ChargeStatus.unknown),
            "refunds": due(Refund, RefundStatus.pending, RefundStatus.unknown),
            "deliveries": due(Delivery, DeliveryStatus.pending),
        },
    )


def replay(db: Session, kind: ParkedKind, item_id: str) -> None:
    """Back in its queue; a charge or refund is asked about before anything is sent again."""
    if kind is ParkedKind.charge:
        charges.replay_parked(db, item_id)
    elif kind is ParkedKind.refund:
        refunds.replay_parked(db, item_id)
    else:
        notifications.replay_parked(db, item_id)


def replay_all(db: Session) -> int:
    found = parked(db, limit=10_000).items
    for item in found:
        replay(db, item.kind, item.id)
    return len(found)
