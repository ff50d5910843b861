"""Tables of the bus: the outbox (which *is* the log in the embedded default), consumer offsets
for the log backend, the consumers' inbox for deduplication, and dead letters."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import make_base
from shared.timeutil import utcnow

Base = make_base("bus")

# SQLite only auto-increments an INTEGER PRIMARY KEY.
RowId = BigInteger().with_variant(Integer(), "sqlite")


class LogRow(Base):
    __tablename__ = "bus_log"
    __table_args__ = (
        Index("ix_bus_log_topic_id", "topic", "id"),
        Index("ix_bus_log_pending", "source", "relayed_at", "id"),
    )

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(64))
    topic: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(String(200))
    event_id: Mapped[str] = mapped_column(String(200))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    relayed_at: Mapped[datetime | None] = mapped_column(default=None)


class LogOffset(Base):
    __tablename__ = "bus_offset"

    group: Mapped[str] = mapped_column(String(200), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger, default=0)


class InboxRow(Base):
    __tablename__ = "bus_inbox"

    consumer: Mapped[str] = mapped_column(String(200), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeadLetter(Base):
    """A message a consumer set aside: `reason` is `bad_data` (it can never succeed as it is),
    `undecodable` (not an event at all; `payload` is the raw record) or `unexpected` (it kept
    failing with an error nobody foresaw). Ops replay it once the cause is fixed."""

    __tablename__ = "bus_dead_letter"
    __table_args__ = (Index("ix_bus_dead_letter_open", "replayed_at", "id"),)

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    consumer: Mapped[str] = mapped_column(String(200))
    topic: Mapped[str] = mapped_column(String(200))
    event_id: Mapped[str] = mapped_column(String(200))
    payload: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str] = mapped_column(String(20), default="bad_data", server_default="bad_data")
    key: Mapped[str | None] = mapped_column(String(200), default=None)  # to replay in order
    replayed_at: Mapped[datetime | None] = mapped_column(default=None)
