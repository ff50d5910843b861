"""Parking sessions: an entry paired with its exit at one car park."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Index, String
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import make_base, new_id
from shared.pii_columns import INDEX_LENGTH, Encrypted, EncryptedText, keep_blind_index
from shared.timeutil import utcnow

Base = make_base("sessions")


class SessionStatus(StrEnum):
    open = "open"
    closed = "closed"
    abandoned = "abandoned"  # a newer entry of the same vehicle arrived before any exit


class ParkingSession(Base):
    __tablename__ = "sessions_session"
    __table_args__ = (
        Index("ix_sessions_vehicle_open", "lot_id", "plate_bidx", "plate_color", "status"),
        Index("ix_sessions_session_plate_bidx", "plate_bidx"),
        Index("ix_sessions_driver", "driver_id", "entered_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    lot_id: Mapped[str] = mapped_column(String(36))
    lot_code: Mapped[str] = mapped_column(String(64))
    district: Mapped[str] = mapped_column(String(40))
    operator_id: Mapped[str] = mapped_column(String(36))
    # Where a car parked is whereabouts (PIPL art. 28): the plate is encrypted, found by index.
    plate: Mapped[str] = mapped_column(Encrypted())
    plate_bidx: Mapped[str] = mapped_column(String(INDEX_LENGTH))
    plate_color: Mapped[str] = mapped_column(String(10))
    vehicle_type: Mapped[str] = mapped_column(String(10))
    driver_id: Mapped[str | None] = mapped_column(String(36), default=None)
    status: Mapped[SessionStatus] = mapped_column(String(12), default=SessionStatus.open)
    entry_event_id: Mapped[str] = mapped_column(String(100), unique=True)  # "<lot>/<event>"
    exit_event_id: Mapped[str | None] = mapped_column(String(100), unique=True, default=None)
    entered_at: Mapped[datetime]
    exited_at: Mapped[datetime | None] = mapped_column(default=None)
    entry_lane: Mapped[str | None] = mapped_column(String(40), default=None)
    exit_lane: Mapped[str | None] = mapped_column(String(40), default=None)
    decision: Mapped[str | None] = mapped_column(String(16), default=None)
    reason: Mapped[str | None] = mapped_column(String(40), default=None)
    # When the plate became its pseudonym and the driver link went (retention, erasure).
    pseudonymised_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UnmatchedExit(Base):
    """An exit that arrived before its entry (replay after an outage reorders events)."""

    __tablename__ = "sessions_unmatched_exit"
    __table_args__ = (
        Index("ix_sessions_unmatched_vehicle", "lot_id", "plate_bidx", "plate_color"),
    )

    event_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    lot_id: Mapped[str] = mapped_column(String(36))
    plate: Mapped[str] = mapped_column(Encrypted())
    plate_bidx: Mapped[str] = mapped_column(String(INDEX_LENGTH))
    plate_color: Mapped[str] = mapped_column(String(10))
    occurred_at: Mapped[datetime]
    payload: Mapped[str] = mapped_column(EncryptedText())  # the exit event, with its plate
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


keep_blind_index(ParkingSession, "plate", "plate")
keep_blind_index(UnmatchedExit, "plate", "plate")
