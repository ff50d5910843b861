"""The sandbox provider's own books: withholding agreements and the charges taken on them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import make_base
from shared.timeutil import utcnow

Base = make_base("paysandbox")


class Agreement(Base):
    __tablename__ = "paysandbox_agreement"

    agreement_no: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    balance_fen: Mapped[int]
    behaviour: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default="active")
    calls: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SandboxCharge(Base):
    __tablename__ = "paysandbox_charge"

    out_trade_no: Mapped[str] = mapped_column(String(100), primary_key=True)
    trade_no: Mapped[str] = mapped_column(String(64), unique=True)
    agreement_no: Mapped[str] = mapped_column(String(64), index=True)
    amount_fen: Mapped[int]
    status: Mapped[str] = mapped_column(String(20))
    failure_code: Mapped[str | None] = mapped_column(String(60), default=None)
    description: Mapped[str] = mapped_column(String(200), default="")
    captured_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
