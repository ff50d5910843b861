"""What the gateway counts of each district's pushes (records by outcome, rejects by reason),
in Redis for `GET /v1/admin/stats` and as Prometheus metrics of the gateway's process. The
adapters' own figures come from the lots service; `gather` puts both side by side."""

from __future__ import annotations

from collections import Counter as Tally
from typing import Any

import redis
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, Field

from shared.errors import UpstreamUnavailable
from shared.runtime import Runtime
from shared.timeutil import utcnow

RECORDS = Counter(
    "citypark_district_records",
    "District records received by the gateway, by outcome and reject reason",
    ["district", "dialect", "status", "reason"],
)
BATCH_SECONDS = Histogram(
    "citypark_district_batch_seconds", "Time to take one district batch", ["district"]
)


def _key(district: str) -> str:
    return f"citypark:gw:district:{district}:stats"


def count(
    r: redis.Redis, district: str, dialect: str, statuses: Tally[str], reasons: Tally[str]
) -> None:
    for status, n in statuses.items():
        if status != "rejected":
            RECORDS.labels(district, dialect, status, "").inc(n)
    for reason, n in reasons.items():
        RECORDS.labels(district, dialect, "rejected", reason).inc(n)
    pipe = r.pipeline(transaction=False)
    for status, n in statuses.items():
        pipe.hincrby(_key(district), status, n)
    for reason, n in reasons.items():
        pipe.hincrby(_key(district), f"rejects:{reason}", n)
    pipe.hset(_key(district), "last_batch_at", utcnow().isoformat())
    pipe.execute()


class DistrictFeed(BaseModel):
    district: str
    # What the district pushed to the gateway.
    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejects: dict[str, int] = Field(default_factory=dict)
    last_batch_at: str | None = None
    # What its adapter made of it.
    entries: int = 0
    exits: int = 0
    events_per_min: float = 0.0
    adapter_rejects: dict[str, int] = Field(default_factory=dict)
    consumer_lag: int | None = None
    last_event_at: str | None = None


def gather(rt: Runtime) -> list[DistrictFeed]:
    """Per district, the gateway's counts and the adapter's, for ops."""
    try:
        adapters: list[dict[str, Any]] = rt.internal("lots").call(
            "GET", "/internal/districts/figures"
        )
    except UpstreamUnavailable:
        adapters = []
    out: list[DistrictFeed] = []
    for a in adapters:
        raw: dict[str, str] = rt.redis.hgetall(_key(a["district"]))  # type: ignore[assignment]
        accepted, duplicates, rejected = (
            int(raw.get(k, 0)) for k in ("accepted", "duplicate", "rejected")
        )
        out.append(
            DistrictFeed(
                district=a["district"],
                received=accepted + duplicates + rejected,
                accepted=accepted,
                duplicates=duplicates,
                rejected=rejected,
                rejects={
                    k.removeprefix("rejects:"): int(v)
                    for k, v in raw.items()
                    if k.startswith("rejects:")
                },
                last_batch_at=raw.get("last_batch_at"),
                entries=a["entries"],
                exits=a["exits"],
                events_per_min=a["events_per_min"],
                adapter_rejects=a["rejects"],
                consumer_lag=a["consumer_lag"],
                last_event_at=a["last_event_at"],
            )
        )
    return out
