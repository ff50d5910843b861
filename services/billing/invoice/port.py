"""The invoice-provider port: whoever issues e-invoices in the tax authority's name.

A provider numbers an invoice and names its issuer. The request id is the invoice id, so a
remote provider can answer a repeat with the first result. The session is passed so that an
in-process provider (the sandbox) keeps its books in the caller's transaction; a remote one
ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy.orm import Session

from services.billing.invoice.models import InvoiceKind


@dataclass(frozen=True)
class InvoiceRequest:
    request_id: str
    kind: InvoiceKind
    title: str
    tax_id: str | None
    amount_fen: int
    original_number: str | None = None  # a credit invoice names the invoice it offsets


@dataclass(frozen=True)
class IssuedInvoice:
    number: str
    issuer: str
    issued_at: datetime


class InvoiceProvider(Protocol):
    name: str

    def issue(self, db: Session, request: InvoiceRequest) -> IssuedInvoice: ...
