"""The sandbox vehicle registry's own table: who owns which plate, with the car's VIN."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import make_base, new_id
from shared.timeutil import utcnow

Base = make_base("vehicleregistry")


class RegisteredVehicle(Base):
    __tablename__ = "vehicleregistry_vehicle"
    __table_args__ = (UniqueConstraint("plate", "plate_color"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    plate: Mapped[str] = mapped_column(String(16))
    plate_color: Mapped[str] = mapped_column(String(10))
    owner_name: Mapped[str] = mapped_column(String(100))
    vin: Mapped[str] = mapped_column(String(17))
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
