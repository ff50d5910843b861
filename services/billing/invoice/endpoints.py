"""Drivers' e-invoices: ask for one over captured charges, list them, fetch one and its PDF."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from sqlalchemy.orm import Session

from services.billing.invoice import pdf
from services.billing.invoice.models import Invoice
from services.billing.invoice.schemas import (
    InvoiceCreate,
    InvoiceDetail,
    InvoiceItemOut,
    InvoiceOut,
)
from services.billing.invoice.service import AlreadyInvoiced, ChargeNotInvoiceable, invoices
from shared.auth import DriverAuth
from shared.deps import DbSession
from shared.errors import NotFound
from shared.http import problem_responses
from shared.plates import mask_plate_for_message

me = APIRouter(prefix="/v1/me", tags=["driver: invoices"])


def _out(invoice: Invoice) -> InvoiceOut:
    return InvoiceOut.model_validate(invoice, from_attributes=True)


def _detail(db: Session, invoice: Invoice) -> InvoiceDetail:
    out = InvoiceDetail.model_validate(_out(invoice).model_dump())
    out.items = [
        InvoiceItemOut.model_validate(i, from_attributes=True).model_copy(
            update={"plate": mask_plate_for_message(i.plate)}
        )
        for i in invoices.items_of(db, invoice)
    ]
    out.credits = [_out(c) for c in invoices.credits_of(db, invoice)]
    return out


@me.post(
    "/invoices",
    status_code=status.HTTP_201_CREATED,
    response_model=InvoiceOut,
    responses=problem_responses(NotFound, AlreadyInvoiced, ChargeNotInvoiceable),
)
def create_invoice(data: InvoiceCreate, who: DriverAuth, db: DbSession) -> InvoiceOut:
    """One e-invoice over one or several of your captured charges (each invoiced at most
    once), made out to `title` (and `tax_id` for a company)."""
    return _out(invoices.create(db, who.id, data.charge_ids, data.title, data.tax_id))


@me.get("/invoices", response_model=list[InvoiceOut])
def list_invoices(
    who: DriverAuth, db: DbSession, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> list[InvoiceOut]:
    """Your invoices, newest first, red-letter credits included."""
    return [_out(i) for i in invoices.list_for(db, who.id, limit)]


@me.get(
    "/invoices/{invoice_id}", response_model=InvoiceDetail, responses=problem_responses(NotFound)
)
def get_invoice(invoice_id: str, who: DriverAuth, db: DbSession) -> InvoiceDetail:
    """One invoice with its charges and the red-letter invoices that offset it."""
    return _detail(db, invoices.get_for(db, who.id, invoice_id))


@me.get(
    "/invoices/{invoice_id}/pdf",
    response_class=Response,
    responses={
        200: {"content": {"application/pdf": {}}, "description": "The invoice as a PDF"},
        **problem_responses(NotFound),
    },
)
def invoice_pdf(invoice_id: str, who: DriverAuth, db: DbSession) -> Response:
    """The invoice as a PDF: number, issuer, buyer, each charge's lot, times and masked plate,
    and the total."""
    invoice = invoices.get_for(db, who.id, invoice_id)
    original = db.get(Invoice, invoice.original_id) if invoice.original_id else None
    body = pdf.render(
        invoice, invoices.items_of(db, invoice), original.number if original else None
    )
    return Response(
        body,
        media_type="application/pdf",
        headers={"content-disposition": f'inline; filename="{invoice.number}.pdf"'},
    )
