"""A reconciliation of one day against the provider's statement, kept for finance."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import Index, String
from sqlalchemy.orm import Mapped, mapped_column

from services.billing.db import Base
from shared.db import new_id
from shared.timeutil import utcnow


class Reconciliation(Base):
    __tablename__ = "billing_reconciliation"
    __table_args__ = (Index("ix_billing_reconciliation_date", "business_date", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    business_date: Mapped[date]
    provider: Mapped[str] = mapped_column(String(40))
    matched: Mapped[int]
    # {"missing_ours": [...], "missing_theirs": [...], "amount_mismatch": [...]}
    differences: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(12))  # clean | open | resolved
    resolution: Mapped[str | None] = mapped_column(String(1000), default=None)
    resolved_by: Mapped[str | None] = mapped_column(String(64), default=None)
    resolved_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
