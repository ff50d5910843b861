"""Where the real infrastructure is. `make test` starts it and sets these variables."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

import pytest
from hypothesis import HealthCheck, settings

# On CI the property tests draw the same examples every run and take the time they need:
# a shared, noisy machine must not turn a slow example into a red build.
settings.register_profile(
    "ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
if os.environ.get("CI"):
    settings.load_profile("ci")


@dataclass(frozen=True)
class Infra:
    pg_host: str
    pg_port: int
    pg_user: str
    pg_password: str
    redis_url: str
    kafka_bootstrap: str

    def database_url(self, dbname: str) -> str:
        return (
            f"postgresql+psycopg://{self.pg_user}:{self.pg_password}@{self.pg_host}:"
            f"{self.pg_port}/{dbname}"
        )


def _infra() -> Infra:
    url = urlparse(
        os.environ.get(
            "CITYPARK_DATABASE_URL",
            "postgresql+psycopg://citypark:citypark@127.0.0.1:5432/citypark",
        )
    )
    return Infra(
        pg_host=url.hostname or "127.0.0.1",
        pg_port=url.port or 5432,
        pg_user=url.username or "citypark",
        pg_password=url.password or "citypark",
        redis_url=os.environ.get("CITYPARK_REDIS_URL", "redis://127.0.0.1:6379/0"),
        kafka_bootstrap=os.environ.get("CITYPARK_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
    )


@pytest.fixture(scope="session")
def infra() -> Infra:
    return _infra()


@contextmanager
def scratch_database(infra: Infra) -> Iterator[str]:
    """A database of its own, dropped afterwards: suites never share state."""
    from pytest_postgresql.janitor import DatabaseJanitor

    name = f"citypark_test_{secrets.token_hex(4)}"
    janitor = DatabaseJanitor(
        user=infra.pg_user,
        password=infra.pg_password,
        host=infra.pg_host,
        port=infra.pg_port,
        dbname=name,
    )
    janitor.init()
    try:
        yield infra.database_url(name)
    finally:
        _drop_database(infra, name)


def _drop_database(infra: Infra, name: str) -> None:
    """Drop a scratch database even while autovacuum works in it.

    The janitor's own drop first terminates every backend in the database and
    fails on an autovacuum worker (a superuser process the test role may not
    signal). A plain DROP DATABASE stops autovacuum workers itself, so only
    this role's lingering sessions are ended here, and the drop is retried
    while one of them is still going away.
    """
    import psycopg

    conninfo = (
        f"host={infra.pg_host} port={infra.pg_port} user={infra.pg_user} "
        f"password={infra.pg_password} dbname=postgres"
    )
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for attempt in range(20):
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND usename = current_user AND pid <> pg_backend_pid()",
                (name,),
            )
            try:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
                return
            except psycopg.errors.ObjectInUse:
                if attempt == 19:
                    raise
                time.sleep(0.25)


@pytest.fixture(scope="session")
def fresh_database(infra: Infra) -> Iterator[str]:
    with scratch_database(infra) as url:
        yield url
