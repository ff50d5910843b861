"""The connector's per-lot request budget comes from settings; a provider still overrides it."""

from __future__ import annotations

import fakeredis
import pytest
from pydantic import SecretStr, ValidationError

from services.gateway.connector import ratelimit
from shared.runtime import Runtime
from shared.settings import Settings

NOW = 1_800_000_000.25  # a quarter second into a one-second window


def runtime(requests: int = 50, window_s: int = 1) -> Runtime:
    settings = Settings(
        jwt_secret=SecretStr("unit-secret-0123456789abcdefghij"),
        connector_rate_limit_requests=requests,
        connector_rate_limit_window_s=window_s,
        _env_file=None,  # type: ignore[call-arg]
    )
    rt = Runtime(settings, source="gateway")
    rt.__dict__["redis"] = fakeredis.FakeRedis()  # in place of the cached real client
    return rt


def admitted(rt: Runtime, n: int, now: float = NOW, lot: str = "lot-1") -> int:
    return sum(ratelimit.check(rt, lot, now) is None for _ in range(n))


def test_the_default_budget_is_fifty_a_second() -> None:
    secret = SecretStr("unit-secret-0123456789abcdefghij")
    rt = Runtime(Settings(jwt_secret=secret, _env_file=None), "gateway")  # type: ignore[call-arg]
    rt.__dict__["redis"] = fakeredis.FakeRedis()
    assert ratelimit.limit_for(rt) == ratelimit.RateLimit(requests=50, window_s=1)
    assert admitted(rt, 60) == 50
    assert admitted(rt, 5, now=NOW + 1) == 5  # the next window starts afresh


def test_the_setting_changes_the_budget() -> None:
    rt = runtime(requests=3)
    assert admitted(rt, 10) == 3
    assert admitted(rt, 10, lot="lot-2") == 3  # per lot
    wait = ratelimit.check(rt, "lot-1", NOW)
    assert wait == pytest.approx(0.75)


def test_the_window_setting_changes_the_wait() -> None:
    rt = runtime(requests=2, window_s=10)
    start = 1_800_000_000.0  # a multiple of 10: a window begins
    assert admitted(rt, 2, now=start) == 2
    # later in the same ten seconds: still over budget, told to wait for the window's end
    assert ratelimit.check(rt, "lot-1", start + 4) == pytest.approx(6)
    assert admitted(rt, 1, now=start + 10) == 1


def test_settings_come_from_the_environment_and_must_be_positive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CITYPARK_JWT_SECRET", "unit-secret-0123456789abcdefghij")
    monkeypatch.setenv("CITYPARK_CONNECTOR_RATE_LIMIT_REQUESTS", "7")
    monkeypatch.setenv("CITYPARK_CONNECTOR_RATE_LIMIT_WINDOW_S", "5")
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert ratelimit.RateLimit.from_settings(s) == ratelimit.RateLimit(7, 5)
    for name in (
        "CITYPARK_CONNECTOR_RATE_LIMIT_REQUESTS",
        "CITYPARK_CONNECTOR_RATE_LIMIT_WINDOW_S",
    ):
        monkeypatch.setenv(name, "0")
        with pytest.raises(ValidationError):
            Settings(_env_file=None)  # type: ignore[call-arg]
        monkeypatch.setenv(name, "5")


def test_a_provider_overrides_the_settings() -> None:
    rt = runtime(requests=3)
    rt.providers[ratelimit.PROVIDER] = ratelimit.RateLimit(requests=6, window_s=1)
    assert admitted(rt, 10) == 6
    del rt.providers[ratelimit.PROVIDER]
    assert admitted(rt, 10, now=NOW + 1) == 3
