"""The city's registry: districts, operators, car parks, their keys and tariff versions."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import BigInteger, Date, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import JSONDoc, make_base, new_id
from shared.pii_columns import INDEX_LENGTH, Encrypted, keep_blind_index
from shared.timeutil import utcnow

Base = make_base("lots")


class District(Base):
    __tablename__ = "lots_district"

    code: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    dialect: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DistrictKey(Base):
    __tablename__ = "lots_district_key"

    key_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    district: Mapped[str] = mapped_column(ForeignKey("lots_district.code"))
    public_key_pem: Mapped[str] = mapped_column(String(2000))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Operator(Base):
    __tablename__ = "lots_operator"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    commission_bps: Mapped[int]
    settlement_account: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Lot(Base):
    __tablename__ = "lots_lot"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    district: Mapped[str] = mapped_column(ForeignKey("lots_district.code"), index=True)
    operator_id: Mapped[str] = mapped_column(ForeignKey("lots_operator.id"), index=True)
    capacity: Mapped[int]
    lat: Mapped[float]  # coordinates, not money: floats are right here
    lng: Mapped[float]
    postpay_enabled: Mapped[bool] = mapped_column(default=True)
    free_spaces: Mapped[int | None] = mapped_column(default=None)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    sdk_version: Mapped[str | None] = mapped_column(String(40), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LotKey(Base):
    __tablename__ = "lots_lot_key"

    # Unique city-wide: the key alone identifies the lot.
    key_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    lot_id: Mapped[str] = mapped_column(ForeignKey("lots_lot.id"), index=True)
    public_key_pem: Mapped[str] = mapped_column(String(2000))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Revoked keys stay on record: a key id is never reused, and the audit can name it.
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class TariffVersion(Base):
    __tablename__ = "lots_tariff"
    __table_args__ = (
        UniqueConstraint("lot_id", "effective_from"),
        Index("ix_lots_tariff_lookup", "lot_id", "effective_from"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    lot_id: Mapped[str] = mapped_column(ForeignKey("lots_lot.id"))
    effective_from: Mapped[datetime]
    document: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """One admin write to the registry: who (admin token id), when, what, before and after."""

    __tablename__ = "lots_audit"
    __table_args__ = (
        Index("ix_lots_audit_entity", "entity", "entity_id"),
        Index("ux_lots_audit_event_id", "event_id", unique=True),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(20))
    action: Mapped[str] = mapped_column(String(60))
    entity: Mapped[str] = mapped_column(String(40))
    entity_id: Mapped[str] = mapped_column(String(200))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, default=None)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, default=None)
    # Which service made the write (every service's admin writes land in this one log).
    service: Mapped[str] = mapped_column(String(20), default="lots", server_default="lots")
    # Why, where the caller must say so (an unmasked look-up).
    reason: Mapped[str | None] = mapped_column(String(500), default=None)
    # The audit event an entry came from, so a redelivered event is recorded once.
    event_id: Mapped[str | None] = mapped_column(String(64), default=None)


class Occupancy(Base):
    """Durable side of a lot's live occupancy; Redis holds the copy the map reads.

    Kept apart from `lots_lot` so that a busy lot's stream of entries and exits does not lock
    the registry row ops edit.
    """

    __tablename__ = "lots_occupancy"

    lot_id: Mapped[str] = mapped_column(ForeignKey("lots_lot.id"), primary_key=True)
    occupied: Mapped[int] = mapped_column(default=0)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class DailyParkings(Base):
    """Parkings served (closed sessions) per district and Asia/Shanghai calendar day."""

    __tablename__ = "lots_parkings_daily"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    district: Mapped[str] = mapped_column(String(40), primary_key=True)
    parkings: Mapped[int] = mapped_column(default=0)


class Pass(Base):
    """A monthly pass or whitelist entry a car park pushed (SPEC §10), named by the lot.

    A deleted pass keeps its row (`deleted_at`) so that a repeated DELETE answers the same,
    and so that the lot's pass list version moves forward on every change.
    """

    __tablename__ = "lots_pass"
    __table_args__ = (Index("ix_lots_pass_vehicle", "plate_bidx", "plate_color"),)

    lot_id: Mapped[str] = mapped_column(ForeignKey("lots_lot.id"), primary_key=True)
    pass_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # A pass names a vehicle: its plate is encrypted at rest and found by its blind index.
    plate: Mapped[str] = mapped_column(Encrypted())
    plate_bidx: Mapped[str] = mapped_column(String(INDEX_LENGTH))
    plate_color: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))
    valid_from: Mapped[datetime]
    valid_to: Mapped[datetime]
    # Daily window on the lot's clock ("HH:MM"); end <= start crosses midnight. Null: all day.
    window_start: Mapped[str | None] = mapped_column(String(5), default=None)
    window_end: Mapped[str | None] = mapped_column(String(5), default=None)
    time_zone: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


keep_blind_index(Pass, "plate", "plate")
