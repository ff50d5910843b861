"""CloudEvents 1.0 envelope (structured JSON) and the typed payloads that cross service lines."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from shared import pii
from shared.settings import Settings
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


class PlateUnsealed(ValueError):
    """A payload holding a plate was about to be serialised without its sealed form."""


class SealedPlate(BaseModel):
    """A payload naming a vehicle. On the wire it carries the plate encrypted (`plate_enc`,
    shared.pii) and the vehicle's pseudonym (`plate_ref`) for joining and keys, never the plate
    itself: Kafka topics are read by every service and kept for days, and where a car parks is
    sensitive personal information (PIPL art. 28). In memory `plate` holds the plaintext for the
    code that needs it; it is excluded from every dump.

    Producers build with `plate=` and call `.sealed(settings)`; consumers call
    `Model.opened(settings, data)`. Events written before sealing carry `plate` in clear and are
    still read (a running city upgrades without losing what is in its topics)."""

    plate: str = Field(default="", exclude=True)
    plate_color: str
    plate_enc: str | None = None
    plate_ref: str | None = None

    def sealed(self, settings: Settings) -> Self:
        """This payload with the plate in its sealed form (and in memory, when it came sealed)."""
        plate = self.plate or (pii.decrypt(settings, self.plate_enc) if self.plate_enc else "")
        if not plate:
            return self
        return self.model_copy(
            update={
                "plate": plate,
                "plate_enc": self.plate_enc or pii.encrypt(settings, plate),
                "plate_ref": self.plate_ref or pii.plate_ref(settings, plate, self.plate_color),
            }
        )

    @classmethod
    def opened(cls, settings: Settings, data: Mapping[str, Any]) -> Self:
        """Parse a payload from the wire, its plate decrypted (or taken as sent by an old
        producer) and sealed again, so it can be passed on as it is."""
        return cls.model_validate(data).sealed(settings)

    @model_serializer(mode="wrap")
    def _never_in_clear(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        if self.plate and not self.plate_enc:
            raise PlateUnsealed(f"{type(self).__name__} must be sealed before it is serialised")
        out: dict[str, Any] = handler(self)
        return out


class LotEvent(SealedPlate):
    """What the gateway accepted from a lot connector, on `citypark.lot-events.<district>`."""

    event_id: str
    kind: Kind
    lot_id: str
    lot_code: str
    district: str
    operator_id: str
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


class SessionClosed(SealedPlate):
    session_id: str
    lot_id: str
    lot_code: str
    district: str
    operator_id: str
    vehicle_type: str
    entered_at: datetime
    exited_at: datetime
    decision: Decision
    reason: str | None = None
    driver_id: str | None = None


class VehicleRef(SealedPlate):
    # Proven against the vehicle registry; events from before the proof existed lack the
    # flag, and an unproven claim must never open post-pay, so absent means unverified.
    verified: bool = False


class AccountUpdated(BaseModel):
    """A driver's full post-pay state: consumers replace what they hold (newer version wins)."""

    driver_id: str
    version: int
    postpay: PostpayStatus
    vehicles: list[VehicleRef] = Field(default_factory=list)

    def sealed(self, settings: Settings) -> Self:
        return self.model_copy(update={"vehicles": [v.sealed(settings) for v in self.vehicles]})

    @classmethod
    def opened(cls, settings: Settings, data: Mapping[str, Any]) -> Self:
        return cls.model_validate(data).sealed(settings)


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
