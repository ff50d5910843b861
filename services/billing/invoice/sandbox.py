"""The sandbox invoice provider: numbers invoices as the all-electronic invoices are numbered
(20 digits: year, province code 32 for Jiangsu, a kind digit, a 15-digit sequence per year)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.billing.invoice.models import InvoiceKind, SandboxInvoiceSeries
from services.billing.invoice.port import InvoiceRequest, IssuedInvoice
from shared.timeutil import utcnow

ISSUER = "苏州市城市停车服务平台（沙箱）"
PROVINCE = "32"


class SandboxInvoiceProvider:
    name = "sandbox"

    def __init__(self, issuer: str = ISSUER) -> None:
        self.issuer = issuer

    def _next(self, db: Session, series: str) -> int:
        dialect = db.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        db.execute(
            insert(SandboxInvoiceSeries).values(series=series, last=0).on_conflict_do_nothing()
        )
        query = select(SandboxInvoiceSeries).where(SandboxInvoiceSeries.series == series)
        if dialect == "postgresql":
            # Concurrent issuers wait for each other: numbers have no duplicates and no gaps
            # other than those of rolled-back transactions.
            query = query.with_for_update()
        row = db.scalar(query)
        assert row is not None  # inserted just above if it was missing
        row.last += 1
        db.flush()
        return row.last

    def issue(self, db: Session, request: InvoiceRequest) -> IssuedInvoice:
        now = utcnow()
        year = f"{now.year % 100:02d}"
        seq = self._next(db, f"{now.year}")
        kind = "1" if request.kind == InvoiceKind.credit else "0"
        return IssuedInvoice(
            number=f"{year}{PROVINCE}{kind}{seq:015d}", issuer=self.issuer, issued_at=now
        )
