"""Starts the city as separate processes — 1 gateway, 10 district adapters, sessions, billing,
lots and the payment sandbox — on the real PostgreSQL, Redis and Kafka."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import redis

from loadtests.topology import ROOT, Ports, Topology, real_env, running_city
from tests.conftest import Infra, scratch_database

City = Topology


@pytest.fixture(scope="module")
def city(infra: Infra) -> Iterator[City]:
    # Logs are kept under .local so that a failed run can be read afterwards.
    logs = ROOT / ".local" / "e2e-logs"
    shutil.rmtree(logs, ignore_errors=True)
    redis_url = infra.redis_url.rsplit("/", 1)[0] + "/7"
    redis.Redis.from_url(redis_url).flushdb()
    with scratch_database(infra) as database_url:
        env = real_env(database_url, redis_url, infra.kafka_bootstrap, Ports())
        with running_city(env, logs) as topology:
            yield topology
