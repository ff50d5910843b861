from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.wire import AwareInstant, JsonInt

EXAMPLE_TARIFF: dict[str, Any] = {
    "time_zone": "Asia/Shanghai",
    "free_minutes": 15,
    "rates": {
        "small": {
            "periods": [
                {
                    "start": "07:00",
                    "end": "21:00",
                    "first_block_minutes": 60,
                    "first_block_fen": 500,
                    "unit_minutes": 30,
                    "unit_fen": 150,
                    "cap_fen": None,
                },
                {
                    "start": "21:00",
                    "end": "07:00",
                    "unit_minutes": 120,
                    "unit_fen": 100,
                    "cap_fen": 500,
                },
            ],
            "daily_cap_fen": 3000,
        },
        "large": {
            "periods": [
                {
                    "start": "07:00",
                    "end": "21:00",
                    "first_block_minutes": 60,
                    "first_block_fen": 1000,
                    "unit_minutes": 30,
                    "unit_fen": 300,
                    "cap_fen": None,
                },
                {
                    "start": "21:00",
                    "end": "07:00",
                    "unit_minutes": 120,
                    "unit_fen": 200,
                    "cap_fen": 1000,
                },
            ],
            "daily_cap_fen": 6000,
        },
    },
    "green_free_minutes": 0,
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OperatorCreate(Strict):
    name: str = Field(min_length=1, max_length=200, examples=["苏州城市停车运营有限公司"])
    commission_bps: JsonInt = Field(ge=0, le=10_000, examples=[600])
    settlement_account: str = Field(min_length=1, max_length=200, examples=["6222020200112233"])


class OperatorOut(BaseModel):
    id: str
    name: str
    commission_bps: int
    settlement_account: str
    created_at: datetime


class PublicKeyIn(Strict):
    key_id: str = Field(
        min_length=3, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$", examples=["gusu-001-2026a"]
    )
    public_key_pem: str = Field(min_length=40, max_length=2000)


class Location(Strict):
    lat: float = Field(ge=-90, le=90, strict=True, examples=[31.3017])
    lng: float = Field(ge=-180, le=180, strict=True, examples=[120.5853])


class LotCreate(Strict):
    code: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", examples=["GS-0001"]
    )
    name: str = Field(min_length=1, max_length=200, examples=["观前街地下停车场"])
    district: str = Field(examples=["gusu"])
    operator_id: str
    capacity: JsonInt = Field(gt=0, le=100_000, examples=[420])
    location: Location
    postpay_enabled: bool = Field(default=True, strict=True)
    public_keys: list[PublicKeyIn] = Field(default_factory=list, max_length=2)
    tariff: dict[str, Any] = Field(examples=[EXAMPLE_TARIFF])


class LotUpdate(Strict):
    """Fields left out stay as they are; none of them can be null (a 422, not a cleared column)."""

    # The defaults only mark "left out" (`exclude_unset`); an explicit null fails the type.
    name: str = Field(default=None, min_length=1, max_length=200)
    operator_id: str = Field(default=None)
    capacity: JsonInt = Field(default=None, gt=0, le=100_000)
    location: Location = Field(default=None)
    postpay_enabled: bool = Field(default=None, strict=True)


class LotOut(BaseModel):
    id: str
    code: str
    name: str
    district: str
    operator_id: str
    capacity: int
    location: Location
    postpay_enabled: bool
    free_spaces: int | None
    online: bool = Field(description="A heartbeat arrived within the last 5 minutes")
    last_heartbeat_at: datetime | None = None
    key_ids: list[str] = Field(description="Active keys (at most two)")
    tariff: dict[str, Any] | None
    created_at: datetime


class LotSummary(BaseModel):
    id: str
    code: str
    name: str
    district: str
    operator_id: str
    capacity: int
    location: Location
    postpay_enabled: bool
    free_spaces: int
    online: bool
    created_at: datetime


class LotPage(BaseModel):
    items: list[LotSummary]
    next_cursor: str | None


class OperatorPage(BaseModel):
    items: list[OperatorOut]
    next_cursor: str | None


class TariffUpdate(Strict):
    effective_from: AwareInstant | None = Field(
        default=None,
        description="When the version takes effect; now when left out. Never in the past.",
        examples=["2026-12-01T00:00:00+08:00"],
    )
    tariff: dict[str, Any] = Field(examples=[EXAMPLE_TARIFF])


class TariffVersionOut(BaseModel):
    id: str
    lot_id: str
    effective_from: datetime
    in_force: bool = Field(description="This version prices stays entering now")
    created_at: datetime
    tariff: dict[str, Any]


class KeyOut(BaseModel):
    key_id: str
    created_at: datetime
    revoked_at: datetime | None = None
    active: bool = True


class DistrictCreate(Strict):
    code: str = Field(
        min_length=2, max_length=40, pattern=r"^[a-z][a-z0-9-]*$", examples=["suzhou-new"]
    )
    name: str = Field(min_length=1, max_length=200)
    dialect: str = Field(examples=["canonical"])
    public_keys: list[PublicKeyIn] = Field(default_factory=list, max_length=2)


class DistrictOut(BaseModel):
    code: str
    name: str
    dialect: str
    key_ids: list[str]


class QuoteRequest(Strict):
    lot_id: str
    entered_at: AwareInstant = Field(examples=["2026-11-25T08:10:00+08:00"])
    exited_at: AwareInstant = Field(examples=["2026-11-25T10:45:00+08:00"])
    vehicle_type: str = Field(default="small", examples=["small"])
    plate_color: str = Field(default="blue", examples=["blue"])
    # With a plate, the vehicle's passes at the lot make their units free (SPEC §10).
    plate: str | None = Field(default=None, max_length=32, examples=["苏E12345"])


class QuoteOut(BaseModel):
    lot_id: str
    fee_fen: int
    breakdown: list[dict[str, Any]]


class LotNearby(BaseModel):
    id: str
    code: str
    name: str
    district: str
    location: Location
    distance_m: int
    capacity: int
    free_spaces: int | None
    postpay_enabled: bool
    online: bool = Field(description="A heartbeat arrived within the last 5 minutes")
    tariff_summary: str


class HeartbeatIn(Strict):
    free_spaces: JsonInt = Field(ge=0)
    total_spaces: JsonInt = Field(ge=0)
    sdk_version: str = Field(max_length=40)


class KeyResolution(BaseModel):
    """Internal: what a signing key id stands for (a lot or a district platform)."""

    key_id: str
    public_key_pem: str
    kind: str  # "lot" | "district"
    lot_id: str | None = None
    lot_code: str | None = None
    operator_id: str | None = None
    district: str
    postpay_enabled: bool = False


class PriceOut(BaseModel):
    lot_id: str
    operator_id: str
    commission_bps: int  # the operator's, at pricing time: billing books the city's share
    fee_fen: int
    breakdown: list[dict[str, Any]]


class PricesIn(Strict):
    items: list[QuoteRequest] = Field(max_length=1000)


class PriceItemOut(BaseModel):
    """One stay's price, or why it has none (`code`, as the single call's problem would say)."""

    price: PriceOut | None = None
    code: str | None = None
    detail: str | None = None


class PricesOut(BaseModel):
    items: list[PriceItemOut]


class AuditEntryOut(BaseModel):
    id: int
    at: datetime
    service: str = Field(description="The service that made the change", examples=["billing"])
    actor: str = Field(description="Id of the admin token that made the change")
    role: str
    action: str
    entity: str
    entity_id: str
    reason: str | None = Field(description="Why, where the caller had to say (unmasked look-ups)")
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class AuditPage(BaseModel):
    items: list[AuditEntryOut]
    next_cursor: str | None


class DistrictStats(BaseModel):
    district: str
    name: str
    lots_connected: int = 0
    lots_online: int = 0
    lots_offline: int = 0
    capacity: int = 0
    free_spaces: int = 0
    parkings_today: int = 0
    parkings_served: int = 0


class LotsStats(BaseModel):
    """Internal: the lots service's share of the city's figures."""

    districts: int
    operators: int
    lots_connected: int
    lots_online: int
    lots_offline: int
    capacity: int
    free_spaces: int
    free_spaces_reported: int
    parkings_today: int
    by_district: list[DistrictStats]
