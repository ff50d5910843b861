"""What follows a refund the provider confirmed, beyond the ledger: the red-letter invoice
when its charge was invoiced, and the event the notification consumer tells the driver from.
Called by the refund flow in the transaction that books the refund."""

from __future__ import annotations

from sqlalchemy.orm import Session

from services.billing.charge.models import Charge
from services.billing.invoice.service import invoices
from services.billing.refund.models import Refund
from shared.bus.outbox import enqueue
from shared.events import EventType, RefundEvent, new_event
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
