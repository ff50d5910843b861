"""Per-lot request budget for the connector API, counted in Redis so every gateway replica
shares it (SPEC §4: 429 with `Retry-After`).

A fixed window, by default 50 requests a second (`connector_rate_limit_requests` and
`connector_rate_limit_window_s` in settings): a gate controller sends a few requests a second
at most, and a replay after an outage goes through batches of 500, so a small budget leaves
honest lots untouched while a runaway connector cannot starve the others.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from shared.errors import RateLimited
from shared.http import problem_response
from shared.runtime import Runtime
from shared.settings import Settings

PROVIDER = "connector.rate_limit"  # a `RateLimit` in `Runtime.providers` overrides the settings


@dataclass(frozen=True)
class RateLimit:
    requests: int
    window_s: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimit:
        return cls(settings.connector_rate_limit_requests, settings.connector_rate_limit_window_s)


def limit_for(rt: Runtime) -> RateLimit:
    override: RateLimit | None = rt.providers.get(PROVIDER)
    return override if override is not None else RateLimit.from_settings(rt.settings)


def check(rt: Runtime, lot_id: str, now: float | None = None) -> float | None:
    """Count this request; seconds to wait when the lot is over its budget, else None."""
    limit = limit_for(rt)
    at = time.time() if now is None else now
    window = int(at // limit.window_s)
    key = f"citypark:gw:rate:{lot_id}:{window}"
    pipe = rt.redis.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, 2 * limit.window_s)
    count, _ = pipe.execute()
    if int(count) <= limit.requests:
        return None
    return (window + 1) * limit.window_s - at


def too_many(retry_after_s: float) -> JSONResponse:
    """The 429 problem, with `Retry-After` in whole seconds (never 0: "now" would be a lie)."""
    seconds = max(1, math.ceil(retry_after_s))
    response = problem_response(
        RateLimited.status,
        RateLimited.code,
        RateLimited.title,
        f"This car park is over its request budget; retry after {seconds} s",
        retry_after_s=seconds,
    )
    response.headers["Retry-After"] = str(seconds)
    return response
