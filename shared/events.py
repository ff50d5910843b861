"""CloudEvents 1.0 envelope (structured JSON) and the typed payloads that cross service lines."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from shared.timeutil import utcnow


class EventType(StrEnum):
    connector_entry = "citypark.connector.entry"
    connector_exit = "citypark.connector.exit"
    parking_entry = "citypark.parking.entry"
    parking_exit = "citypark.parking.exit"
    session_closed = "citypark.session.closed"
    account_updated = "citypark.account.updated"
    charge_captured = "citypark.charge.captured"
    charge_declined = "citypark.charge.declined"
    refund_succeeded = "citypark.refund.succeeded"
    admin_write = "citypark.audit.admin-write"


class CloudEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    specversion: str = "1.0"
    id: str
    source: str
    type: str
    time: datetime
    subject: str | None = None
    datacontenttype: str = "application/json"
    data: dict[str, Any]

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> CloudEvent:
        return cls.model_validate_json(raw)


def new_event(
    type_: EventType,
    *,
    source: str,
    data: BaseModel,
    subject: str | None = None,
    id_: str | None = None,
) -> CloudEvent:
    return CloudEvent(
        id=id_ or str(uuid.uuid4()),
        source=source,
        type=type_,
        time=utcnow(),
        subject=subject,
        data=data.model_dump(mode="json"),
    )


SESSION_NS = uuid.UUID("6f1c3a52-5d0e-4c1e-9a57-2b8d0c7e4f10")


def session_id_for(lot_id: str, entry_event_id: str) -> str:
    """The session id derives from its entry, so the gateway can name it at the exit gate."""
    return str(uuid.uuid5(SESSION_NS, f"{lot_id}/{entry_event_id}"))


D = TypeVar("D", bound=BaseModel)


class Typed(Generic[D]):
    """Parse an event's data with its schema: `Typed(ParkingEvent).of(event)`."""

    def __init__(self, model: type[D]) -> None:
        self.model = model

    def of(self, event: CloudEvent) -> D:
        return self.model.model_validate(event.data)


class Kind(StrEnum):
    entry = "entry"
    exit = "exit"


class Decision(StrEnum):
    postpay = "postpay"
    pay_on_site = "pay_on_site"
    free = "free"


class PostpayStatus(StrEnum):
    active = "active"
    suspended = "suspended"
    no_account = "no_account"


class LotEvent(BaseModel):
    """What the gateway accepted from a lot connector, on `citypark.lot-events.<district>`."""

    event_id: str
    kind: Kind
    lot_id: str
    lot_code: str
    district: str
    operator_id: str
    plate: str
    plate_color: str
    vehicle_type: str = "small"
    occurred_at: datetime
    received_at: datetime
    lane: str | None = None
    # Only for exits: the gate decision given, and whose account it counted on.
    decision: Decision | None = None
    reason: str | None = None
    driver_id: str | None = None
    # Only for exits the gate decided without the city: what it answered then
    # ({decision, reason, eligibility_version, decided_at}), kept whatever was recorded.
    offline_decision: dict[str, Any] | None = None


class ParkingEvent(LotEvent):
    """Canonical entry/exit after the district adapter, on `citypark.parking-events`."""

    dialect: str = "canonical"


class SessionClosed(BaseModel):
    session_id: str
    lot_id: str
    lot_code: str
    district: str
    operator_id: str
    plate: str
    plate_color: str
    vehicle_type: str
    entered_at: datetime
    exited_at: datetime
    decision: Decision
    reason: str | None = None
    driver_id: str | None = None


class VehicleRef(BaseModel):
    plate: str
    plate_color: str
    # Proven against the vehicle registry; events from before the proof existed lack the
    # flag, and an unproven claim must never open post-pay, so absent means unverified.
    verified: bool = False


class AccountUpdated(BaseModel):
    """A driver's full post-pay state: consumers replace what they hold (newer version wins)."""

    driver_id: str
    version: int
    postpay: PostpayStatus
    vehicles: list[VehicleRef] = Field(default_factory=list)


class ChargeEvent(BaseModel):
    charge_id: str
    session_id: str
    driver_id: str
    operator_id: str
    amount_fen: int
    status: str
    failure_code: str | None = None


class RefundEvent(BaseModel):
    """A refund the provider confirmed, on `citypark.billing-events` (key: driver id)."""

    refund_id: str
    charge_id: str
    driver_id: str
    amount_fen: int
    # The red-letter invoice issued for it, when the charge had been invoiced.
    credit_invoice_number: str | None = None
