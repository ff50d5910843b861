"""Redis in the real topology; an in-process fakeredis server in the embedded default."""

from __future__ import annotations

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
