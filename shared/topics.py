"""Kafka topic names (SPEC §2) and the seeded districts of Suzhou."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.settings import KafkaAuth

PARKING_EVENTS = "citypark.parking-events"  # key: lot id
SESSIONS_CLOSED = "citypark.sessions-closed"  # key: account (driver) id
BILLING_EVENTS = "citypark.billing-events"
ACCOUNT_EVENTS = "citypark.account-events"
AUDIT_EVENTS = "citypark.audit-events"  # key: the audited entity; lots keeps the one log
LOT_EVENTS_PREFIX = "citypark.lot-events."


def lot_events(district: str) -> str:
    """One topic per district: what the gateway accepted from that district's lots."""
    return LOT_EVENTS_PREFIX + district


@dataclass(frozen=True)
class DistrictSeed:
    code: str
    name: str
    dialect: str


# Districts are data: these ten are seeded; more are added through the admin API.
SUZHOU_DISTRICTS: tuple[DistrictSeed, ...] = (
    DistrictSeed("gusu", "姑苏区", "canonical"),
    DistrictSeed("huqiu", "虎丘区(高新区)", "legacy-json"),
    DistrictSeed("wuzhong", "吴中区", "canonical"),
    DistrictSeed("xiangcheng", "相城区", "xml"),
    DistrictSeed("wujiang", "吴江区", "csv"),
    DistrictSeed("sip", "苏州工业园区", "canonical"),
    DistrictSeed("changshu", "常熟市", "legacy-json"),
    DistrictSeed("zhangjiagang", "张家港市", "xml"),
    DistrictSeed("kunshan", "昆山市", "csv"),
    DistrictSeed("taicang", "太仓市", "canonical"),
)


def all_topics(districts: tuple[str, ...] | None = None) -> list[str]:
    codes = districts if districts is not None else tuple(d.code for d in SUZHOU_DISTRICTS)
    return [PARKING_EVENTS, SESSIONS_CLOSED, BILLING_EVENTS, ACCOUNT_EVENTS, AUDIT_EVENTS] + [
        lot_events(c) for c in codes
    ]


def ensure_topics(
    bootstrap: str, topics: list[str], partitions: int = 3, auth: KafkaAuth | None = None
) -> list[str]:
    """Create the topics that do not exist yet (the broker does not auto-create them); returns
    those created. Idempotent, so a district's topic can be ensured by whoever needs it first.
    `auth`: the caller's settings, for a broker that wants SASL credentials."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from shared.bus.kafka import client_config

    admin = KafkaAdminClient(
        **(client_config(auth) if auth is not None else {}),
        bootstrap_servers=bootstrap.split(","),
        client_id="citypark-topics",
    )
    try:
        missing = [t for t in topics if t not in set(admin.list_topics())]
        created: list[str] = []
        for name in missing:
            try:
                admin.create_topics([NewTopic(name, partitions, replication_factor=1)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass  # another process won the race: the topic is there, which is all we need
        return created
    finally:
        admin.close()
