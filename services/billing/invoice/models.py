"""E-invoices (电子发票): one per request over captured charges, red-letter credits for refunds."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Index, String
from sqlalchemy.orm import Mapped, mapped_column

from services.billing.db import Base
from shared.db import new_id
from shared.pii_columns import Encrypted
from shared.timeutil import utcnow


class InvoiceKind(StrEnum):
    normal = "normal"  # 蓝字发票
    credit = "credit"  # 红字发票: negative, offsets (part of) a normal invoice after a refund


class InvoiceStatus(StrEnum):
    issued = "issued"
    partially_credited = "partially_credited"
    credited = "credited"  # fully offset by red-letter invoices


class Invoice(Base):
    __tablename__ = "billing_invoice"
    __table_args__ = (Index("ix_billing_invoice_driver", "driver_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    driver_id: Mapped[str] = mapped_column(String(36))
    kind: Mapped[InvoiceKind] = mapped_column(String(10), default=InvoiceKind.normal)
    status: Mapped[InvoiceStatus] = mapped_column(String(20), default=InvoiceStatus.issued)
    # The provider's number; unique city-wide, as the tax authority's numbers are.
    number: Mapped[str] = mapped_column(String(32), unique=True)
    title: Mapped[str] = mapped_column(String(200))
    tax_id: Mapped[str | None] = mapped_column(String(20), default=None)
    # Negative on a credit invoice.
    amount_fen: Mapped[int]
    issuer: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(40))
    # A credit invoice: the invoice it offsets, the refund that caused it and its charge.
    original_id: Mapped[str | None] = mapped_column(String(36), default=None, index=True)
    refund_id: Mapped[str | None] = mapped_column(String(36), default=None, unique=True)
    charge_id: Mapped[str | None] = mapped_column(String(36), default=None)
    issued_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class InvoiceItem(Base):
    """One invoiced charge, with what the PDF shows of it. A charge is invoiced at most once:
    the unique charge id is the last word when two requests race."""

    __tablename__ = "billing_invoice_item"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    invoice_id: Mapped[str] = mapped_column(String(36), index=True)
    charge_id: Mapped[str] = mapped_column(String(36), unique=True)
    amount_fen: Mapped[int]
    lot_code: Mapped[str] = mapped_column(String(64))
    plate: Mapped[str] = mapped_column(Encrypted())  # at rest; never looked up by plate
    entered_at: Mapped[datetime]
    exited_at: Mapped[datetime]


class SandboxInvoiceSeries(Base):
    """The sandbox invoice provider's numbering: one counter per year, taken under a row lock."""

    __tablename__ = "billing_invoice_sandbox_series"

    series: Mapped[str] = mapped_column(String(16), primary_key=True)
    last: Mapped[int] = mapped_column(default=0)
