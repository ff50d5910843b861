"""Daily settlement per operator: frozen once run, so a second run changes nothing."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from services.billing.db import Base
from shared.timeutil import utcnow


class SettlementRun(Base):
    __tablename__ = "billing_settlement_run"

    business_date: Mapped[date] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Settlement(Base):
    __tablename__ = "billing_settlement"

    business_date: Mapped[date] = mapped_column(primary_key=True)
    operator_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    captured_fen: Mapped[int] = mapped_column(BigInteger)
    refunded_fen: Mapped[int] = mapped_column(BigInteger)
    commission_fen: Mapped[int] = mapped_column(BigInteger)
    payable_fen: Mapped[int] = mapped_column(BigInteger)
