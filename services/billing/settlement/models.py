"""Daily settlement per operator: frozen once run, so a second run changes nothing.

Every capture and refund journal a run pays out is recorded as one `SettlementItem`. Its
primary key is the journal, so an item can be paid by one settlement only, whichever of two
racing runs inserts it first; what a run pays is exactly the items it managed to insert.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from services.billing.db import Base
from services.billing.ledger.models import Journal
from shared.timeutil import utcnow


class SettlementRun(Base):
    __tablename__ = "billing_settlement_run"

    business_date: Mapped[date] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Journals of this day written from here on may have been invisible to the run (still
    # uncommitted): later runs look for unpaid ones among them. Earlier ones it saw.
    late_from: Mapped[datetime]


class Settlement(Base):
    """One operator's settlement of one day. The four figures are the day's own money; the
    adjustments it also pays (items of earlier, already settled days) are its items whose
    `business_date` is another day."""

    __tablename__ = "billing_settlement"

    business_date: Mapped[date] = mapped_column(primary_key=True)
    operator_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    captured_fen: Mapped[int] = mapped_column(BigInteger)
    refunded_fen: Mapped[int] = mapped_column(BigInteger)
    commission_fen: Mapped[int] = mapped_column(BigInteger)
    payable_fen: Mapped[int] = mapped_column(BigInteger)


class SettlementItem(Base):
    """A capture or refund journal, and the settlement (run day, operator) that paid it."""

    __tablename__ = "billing_settlement_item"
    __table_args__ = (
        Index("ix_billing_settlement_item_settlement", "settlement_date", "operator_id"),
    )

    journal_id: Mapped[str] = mapped_column(ForeignKey(Journal.id), primary_key=True)
    settlement_date: Mapped[date]
    operator_id: Mapped[str] = mapped_column(String(36))
    # The day the money belongs to; another day than `settlement_date` makes it an adjustment.
    business_date: Mapped[date]
    kind: Mapped[str] = mapped_column(String(40))  # the journal's kind
    reference: Mapped[str] = mapped_column(String(100))  # the charge's or the refund's id
    captured_fen: Mapped[int] = mapped_column(BigInteger)
    refunded_fen: Mapped[int] = mapped_column(BigInteger)
    commission_fen: Mapped[int] = mapped_column(BigInteger)

    @property
    def payable_fen(self) -> int:
        return self.captured_fen - self.refunded_fen - self.commission_fen
