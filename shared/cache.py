"""Redis in the real topology; an in-process fakeredis server in the embedded default."""

from __future__ import annotations

import time

import redis

from shared.settings import CacheKind, Settings


def make_redis(settings: Settings) -> redis.Redis:
    if settings.cache is CacheKind.memory:
        import fakeredis

        return fakeredis.FakeRedis(server=_shared_fake_server(), decode_responses=True)
    return redis.Redis.from_url(
        settings.redis_url, decode_responses=True, socket_timeout=5, health_check_interval=30
    )


_FAKE_SERVER: object | None = None


def _shared_fake_server() -> object:
    # One fake server per process so every part of the embedded city sees the same keys.
    global _FAKE_SERVER
    if _FAKE_SERVER is None:
        import fakeredis

        _FAKE_SERVER = fakeredis.FakeServer()
    return _FAKE_SERVER


def count_in_window(
    r: redis.Redis, key: str, window_s: int, now: float | None = None
) -> tuple[int, float]:
    """Count one event in the fixed window of `window_s` seconds that holds `now`.

    Returns (events in this window so far, this one included; seconds until the window ends).
    INCR is atomic, so every replica sharing the Redis sees one count; the key outlives its
    window a little and then expires.
    """
    at = time.time() if now is None else now
    window = int(at // window_s)
    pipe = r.pipeline(transaction=True)
    pipe.incr(f"{key}:{window}")
    pipe.expire(f"{key}:{window}", window_s + 60)
    count, _ = pipe.execute()
    return int(count), (window + 1) * window_s - at
