"""Append-only double-entry ledger: balances derive from entries, never from updated rows."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from services.billing.db import Base
from shared.db import new_id
from shared.timeutil import utcnow


class Journal(Base):
    __tablename__ = "billing_journal"
    # One journal of a kind per reference: a capture can never be booked twice. Settlement
    # reads a day's journals, and those booked to a settled day since its run, by the index.
    __table_args__ = (
        UniqueConstraint("kind", "ref_type", "ref_id"),
        Index("ix_billing_journal_day", "business_date", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(40))
    ref_type: Mapped[str] = mapped_column(String(40))
    ref_id: Mapped[str] = mapped_column(String(100))
    # The Asia/Shanghai day the money moved at the provider (settlement works by it).
    business_date: Mapped[date]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LedgerEntry(Base):
    __tablename__ = "billing_ledger_entry"
    __table_args__ = (Index("ix_billing_entry_account", "account"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    journal_id: Mapped[str] = mapped_column(ForeignKey("billing_journal.id"), index=True)
    account: Mapped[str] = mapped_column(String(120))
    # Debits positive, credits negative: every journal, and so the whole ledger, sums to zero.
    amount_fen: Mapped[int] = mapped_column(BigInteger)
