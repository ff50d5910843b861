"""Drivers' claims on vehicles, and which of them the vehicle registry has proven."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from services.billing.db import Base
from shared.db import new_id
from shared.pii_columns import INDEX_LENGTH, Encrypted, keep_blind_index
from shared.timeutil import utcnow


class VehicleStatus(StrEnum):
    unverified = "unverified"  # claimed; nothing of the car is shown or charged on it
    verified = "verified"  # the registry confirmed the owner: one driver per plate at a time
    superseded = "superseded"  # another driver proved ownership later and took the plate over


class Vehicle(Base):
    """One driver's claim on a plate. Several drivers may claim a plate; at most one holds it
    verified (enforced by `vehicle.service` under a row lock of the plate's claims)."""

    __tablename__ = "billing_vehicle"
    __table_args__ = (
        UniqueConstraint("driver_id", "plate_bidx", "plate_color"),
        Index("ix_billing_vehicle_plate", "plate_bidx", "plate_color"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    driver_id: Mapped[str] = mapped_column(ForeignKey("billing_driver.id"), index=True)
    # Encrypted at rest; claims of a plate are found (and kept one per driver) by blind index.
    plate: Mapped[str] = mapped_column(Encrypted())
    plate_bidx: Mapped[str] = mapped_column(String(INDEX_LENGTH))
    plate_color: Mapped[str] = mapped_column(String(10))
    status: Mapped[VehicleStatus] = mapped_column(String(12), default=VehicleStatus.unverified)
    # The driver sees parkings of the plate from `verified_at` until `superseded_at`.
    verified_at: Mapped[datetime | None] = mapped_column(default=None)
    superseded_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


keep_blind_index(Vehicle, "plate", "plate")
