"""District figures kept by the adapters: events per minute, rejects by reason, consumer lag and
the last event time, in Redis (read by ops through the stats endpoint, across processes) and as
Prometheus metrics of the adapter's process."""

from __future__ import annotations

import time
from typing import Any

import redis
from prometheus_client import Counter, Gauge

from shared.timeutil import utcnow

STATS_TTL_S = 8 * 24 * 3600  # a redelivery comes at most this late; counted once within it
MINUTE_TTL_S = 180

EVENTS = Counter(
    "citypark_district_events", "Canonical events the adapter published", ["district", "kind"]
)
REJECTS = Counter(
    "citypark_district_adapter_rejects",
    "Records the adapter refused after the gateway had taken them",
    ["district", "reason"],
)
LAG = Gauge("citypark_district_consumer_lag", "Records on the topic not yet handled", ["district"])
LAST_EVENT = Gauge(
    "citypark_district_last_event_timestamp_seconds",
    "When the adapter last handled an event (unix time)",
    ["district"],
)


def stats_key(district: str) -> str:
    return f"citypark:district:{district}:stats"


def _minute_key(district: str, minute: int) -> str:
    return f"citypark:district:{district}:min:{minute}"


class AdapterFigures:
    """Counts each event once, however often it is delivered (a seen-marker per event id)."""

    def __init__(self, r: redis.Redis, district: str) -> None:
        self.redis = r
        self.district = district
        self.key = stats_key(district)

    def _first(self, event_id: str) -> bool:
        return bool(self.redis.set(f"{self.key}:seen:{event_id}", 1, nx=True, ex=STATS_TTL_S))

    def published(self, events: list[tuple[str, str]]) -> None:
        """Count `(event_id, kind)` pairs, each once: two round trips whatever their number."""
        if not events:
            return
        now = time.time()
        LAST_EVENT.labels(self.district).set(now)
        pipe = self.redis.pipeline(transaction=False)
        for event_id, _ in events:
            pipe.set(f"{self.key}:seen:{event_id}", 1, nx=True, ex=STATS_TTL_S)
        firsts = [kind for (_, kind), new in zip(events, pipe.execute(), strict=True) if new]
        if not firsts:
            return
        minute = _minute_key(self.district, int(now // 60))
        for kind in set(firsts):
            n = firsts.count(kind)
            EVENTS.labels(self.district, kind).inc(n)
            pipe.hincrby(self.key, kind, n)
        pipe.hset(self.key, "last_event_at", utcnow().isoformat())
        pipe.incrby(minute, len(firsts))
        pipe.expire(minute, MINUTE_TTL_S)
        pipe.execute()

    def rejected(self, event_id: str, reason: str) -> None:
        if not self._first(event_id):
            return
        REJECTS.labels(self.district, reason).inc()
        self.redis.hincrby(self.key, f"rejects:{reason}", 1)

    def lag(self, records: int) -> None:
        LAG.labels(self.district).set(records)
        self.redis.hset(self.key, mapping={"lag": records, "lag_at": utcnow().isoformat()})


def events_per_minute(r: redis.Redis, district: str, now: float | None = None) -> float:
    """Events of the trailing 60 s: this minute so far plus the overlapping share of the last."""
    now = time.time() if now is None else now
    minute = int(now // 60)
    current, previous = r.mget(_minute_key(district, minute), _minute_key(district, minute - 1))
    elapsed = (now % 60) / 60
    return round(int(current or 0) + int(previous or 0) * (1 - elapsed), 1)


def read(r: redis.Redis, district: str) -> dict[str, Any]:
    raw: dict[str, str] = r.hgetall(stats_key(district))  # type: ignore[assignment]
    return {
        "district": district,
        "entries": int(raw.get("entry", 0)),
        "exits": int(raw.get("exit", 0)),
        "events_per_min": events_per_minute(r, district),
        "rejects": {
            k.removeprefix("rejects:"): int(v) for k, v in raw.items() if k.startswith("rejects:")
        },
        "consumer_lag": int(raw["lag"]) if "lag" in raw else None,
        "last_event_at": raw.get("last_event_at"),
    }
