"""E-invoices over a driver's captured charges, issued through the invoice-provider port.

A charge is invoiced at most once: the charges are locked in id order while the request is
checked, and the item's unique charge id settles any race that gets past that. The amount of a
charge on an invoice is what is left of it after refunds. A refund that succeeds after the
charge was invoiced gets a red-letter (credit) invoice for the refunded amount, linked to the
original, in the same transaction that books the refund.
"""

from __future__ import annotations

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.billing.charge.models import Charge, ChargeStatus
from services.billing.invoice.models import (
    Invoice,
    InvoiceItem,
    InvoiceKind,
    InvoiceStatus,
)
from services.billing.invoice.port import InvoiceProvider, InvoiceRequest
from services.billing.invoice.sandbox import SandboxInvoiceProvider
from services.billing.refund.models import Refund
from shared.db import new_id
from shared.errors import NotFound, problem

log = structlog.get_logger(__name__)

AlreadyInvoiced = problem(409, "already_invoiced", "A charge is already on an invoice")
ChargeNotInvoiceable = problem(
    409, "charge_not_invoiceable", "Only captured charges with money left can be invoiced"
)


class InvoiceService:
    def __init__(self, provider: InvoiceProvider) -> None:
        self.provider = provider

    def create(
        self,
        db: Session,
        driver_id: str,
        charge_ids: list[str],
        title: str,
        tax_id: str | None,
    ) -> Invoice:
        wanted = sorted(set(charge_ids))
        query = select(Charge).where(Charge.id.in_(wanted)).order_by(Charge.id)
        if db.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()  # two requests over one charge: one waits
        found = {c.id: c for c in db.scalars(query)}
        # Another driver's charge is answered exactly like one that does not exist.
        missing = [i for i in wanted if i not in found or found[i].driver_id != driver_id]
        if missing:
            raise NotFound(f"No such charge: {', '.join(missing)}")
        charges = [found[i] for i in wanted]
        not_captured = [c.id for c in charges if c.status != ChargeStatus.captured]
        if not_captured:
            raise ChargeNotInvoiceable(
                f"Not captured: {', '.join(not_captured)}", charge_ids=not_captured
            )
        taken = list(
            db.scalars(select(InvoiceItem.charge_id).where(InvoiceItem.charge_id.in_(wanted)))
        )
        if taken:
            raise AlreadyInvoiced(f"Already invoiced: {', '.join(taken)}", charge_ids=sorted(taken))
        empty = [c.id for c in charges if c.amount_fen - c.refunded_fen <= 0]
        if empty:
            raise ChargeNotInvoiceable(f"Fully refunded: {', '.join(empty)}", charge_ids=empty)
        invoice = Invoice(
            driver_id=driver_id,
            kind=InvoiceKind.normal,
            title=title.strip(),
            tax_id=tax_id,
            amount_fen=sum(c.amount_fen - c.refunded_fen for c in charges),
        )
        self._issue(db, invoice, original_number=None)
        for c in charges:
            db.add(
                InvoiceItem(
                    invoice_id=invoice.id,
                    charge_id=c.id,
                    amount_fen=c.amount_fen - c.refunded_fen,
                    lot_code=c.lot_code,
                    plate=c.plate,
                    entered_at=c.entered_at,
                    exited_at=c.exited_at,
                )
            )
        try:
            with db.begin_nested():
                db.flush()
        except IntegrityError as exc:  # a concurrent request invoiced one of them first
            raise AlreadyInvoiced("A charge was invoiced by another request") from exc
        log.info("invoice.issued", invoice_id=invoice.id, amount_fen=invoice.amount_fen)
        return invoice

    def _issue(self, db: Session, invoice: Invoice, original_number: str | None) -> None:
        invoice.id = invoice.id or new_id()
        issued = self.provider.issue(
            db,
            InvoiceRequest(
                request_id=invoice.id,
                kind=invoice.kind,
                title=invoice.title,
                tax_id=invoice.tax_id,
                amount_fen=invoice.amount_fen,
                original_number=original_number,
            ),
        )
        invoice.number = issued.number
        invoice.issuer = issued.issuer
        invoice.issued_at = issued.issued_at
        invoice.provider = self.provider.name
        db.add(invoice)
        db.flush()

    def credit_for_refund(self, db: Session, charge: Charge, refund: Refund) -> Invoice | None:
        """The red-letter invoice of a succeeded refund, if its charge was invoiced (once)."""
        item = db.scalar(select(InvoiceItem).where(InvoiceItem.charge_id == charge.id))
        if item is None:
            return None
        existing = db.scalar(select(Invoice).where(Invoice.refund_id == refund.id))
        if existing is not None:
            return existing
        original = db.get(Invoice, item.invoice_id)
        assert original is not None  # an item always has its invoice
        credit = Invoice(
            driver_id=original.driver_id,
            kind=InvoiceKind.credit,
            title=original.title,
            tax_id=original.tax_id,
            amount_fen=-refund.amount_fen,
            original_id=original.id,
            refund_id=refund.id,
            charge_id=charge.id,
        )
        self._issue(db, credit, original_number=original.number)
        credited = -int(
            db.scalar(
                select(func.coalesce(func.sum(Invoice.amount_fen), 0)).where(
                    Invoice.original_id == original.id
                )
            )
            or 0
        )
        original.status = (
            InvoiceStatus.credited
            if credited >= original.amount_fen
            else InvoiceStatus.partially_credited
        )
        log.info(
            "invoice.credited",
            invoice_id=credit.id,
            original_id=original.id,
            amount_fen=credit.amount_fen,
        )
        return credit

    def list_for(self, db: Session, driver_id: str, limit: int = 50) -> list[Invoice]:
        return list(
            db.scalars(
                select(Invoice)
                .where(Invoice.driver_id == driver_id)
                .order_by(Invoice.created_at.desc(), Invoice.id)
                .limit(limit)
            )
        )

    def get_for(self, db: Session, driver_id: str, invoice_id: str) -> Invoice:
        invoice = db.get(Invoice, invoice_id)
        if invoice is None or invoice.driver_id != driver_id:
            raise NotFound("No such invoice")
        return invoice

    def items_of(self, db: Session, invoice: Invoice) -> list[InvoiceItem]:
        if invoice.kind == InvoiceKind.credit:
            # A credit shows the refunded charge as the line it offsets, at the refunded amount.
            item = db.scalar(select(InvoiceItem).where(InvoiceItem.charge_id == invoice.charge_id))
            if item is None:
                return []
            # Built for display only, never added to the session.
            line = InvoiceItem(
                invoice_id=invoice.id,
                charge_id=item.charge_id,
                amount_fen=invoice.amount_fen,
                lot_code=item.lot_code,
                plate=item.plate,
                entered_at=item.entered_at,
                exited_at=item.exited_at,
            )
            return [line]
        return list(
            db.scalars(
                select(InvoiceItem)
                .where(InvoiceItem.invoice_id == invoice.id)
                .order_by(InvoiceItem.entered_at)
            )
        )

    def credits_of(self, db: Session, invoice: Invoice) -> list[Invoice]:
        return list(
            db.scalars(
                select(Invoice)
                .where(Invoice.original_id == invoice.id)
                .order_by(Invoice.created_at)
            )
        )


invoices = InvoiceService(SandboxInvoiceProvider())
