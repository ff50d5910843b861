"""What billing's own flows tell drivers, in the transaction that changes the money:

- a refund the provider confirmed: the red-letter invoice when its charge was invoiced, and the
  event the notification consumer tells the driver from (called by the refund flow);
- a post-pay exit: the notification with the fee, when the session's charge is opened (called
  by the charge flow), so no consumer has to wait for the charge to exist."""

from __future__ import annotations

from sqlalchemy.orm import Session

from services.billing.charge.models import Charge
from services.billing.invoice.service import invoices
from services.billing.notification import service as notifications
from services.billing.notification import texts
from services.billing.notification.models import NotificationKind
from services.billing.refund.models import Refund
from shared.bus.outbox import enqueue
from shared.events import EventType, RefundEvent, SessionClosed, new_event
from shared.plates import mask_plate_for_message
from shared.topics import BILLING_EVENTS

SOURCE = "billing"


def refund_succeeded(db: Session, charge: Charge, refund: Refund) -> None:
    credit = invoices.credit_for_refund(db, charge, refund)
    data = RefundEvent(
        refund_id=refund.id,
        charge_id=charge.id,
        driver_id=charge.driver_id,
        amount_fen=refund.amount_fen,
        credit_invoice_number=credit.number if credit is not None else None,
    )
    enqueue(
        db,
        source=SOURCE,
        topic=BILLING_EVENTS,
        key=charge.driver_id,
        event=new_event(
            EventType.refund_succeeded,
            source=SOURCE,
            data=data,
            subject=refund.id,
            id_=f"{EventType.refund_succeeded}-{refund.id}",
        ),
    )


def tell_exit(db: Session, closed: SessionClosed, fee_fen: int | None) -> None:
    """The driver's exit notification (once per session, whoever calls first); `fee_fen` None
    when the fee is not known (it then comes with the capture)."""
    assert closed.driver_id
    plate = mask_plate_for_message(closed.plate)
    title, body = texts.exit_(plate, closed.lot_code, closed.entered_at, closed.exited_at, fee_fen)
    notifications.notify(
        db,
        driver_id=closed.driver_id,
        kind=NotificationKind.exit,
        key=f"exit:{closed.session_id}",
        title=title,
        body=body,
        plate=plate,
        amount_fen=fee_fen,
        ref_id=closed.session_id,
    )


def session_charged(db: Session, closed: SessionClosed, charge: Charge) -> None:
    tell_exit(db, closed, charge.amount_fen)
