from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class InvoiceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    charge_ids: list[str] = Field(min_length=1, max_length=100)
    title: str = Field(min_length=1, max_length=200, examples=["苏州某某科技有限公司"])
    # 统一社会信用代码 (18) or an older taxpayer number (15 or 20); omitted for a person.
    tax_id: str | None = Field(
        default=None, pattern=r"^[0-9A-Z]{15,20}$", examples=["91320500MA1XXXXX0X"]
    )


class InvoiceOut(BaseModel):
    id: str
    number: str
    amount_fen: int
    status: str
    kind: str
    title: str
    tax_id: str | None
    issuer: str
    issued_at: datetime
    original_id: str | None = None


class InvoiceItemOut(BaseModel):
    charge_id: str
    amount_fen: int
    lot_code: str
    plate: str
    entered_at: datetime
    exited_at: datetime


class InvoiceDetail(InvoiceOut):
    items: list[InvoiceItemOut] = []
    # Red-letter invoices that offset this one (refunds after invoicing).
    credits: list[InvoiceOut] = []
