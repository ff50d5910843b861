"""Starts the city as separate processes — 1 gateway, 10 district adapters, sessions, billing,
lots and the payment sandbox — on the real PostgreSQL, Redis and Kafka."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from shared.topics import SUZHOU_DISTRICTS
from tests.conftest import Infra, scratch_database

ROOT = Path(__file__).resolve().parents[2]
CITYPARK = str(Path(sys.executable).parent / "citypark")
PORTS = {"gateway": 18000, "lots": 18001, "sessions": 18002, "billing": 18003, "paysandbox": 18090}


@dataclass
class City:
    gateway: str
    sandbox: str
    env: dict[str, str]
    logs: Path

    def admin_token(self, role: str = "admin") -> str:
        out = subprocess.run(
            [CITYPARK, "admin", "token", "--role", role],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        return out.stdout.strip().splitlines()[-1]


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not healthy in {deadline_s}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def city(infra: Infra) -> Iterator[City]:
    with scratch_database(infra) as database_url:
        yield from _city(infra, database_url)


def _city(infra: Infra, fresh_database: str) -> Iterator[City]:
    # Kept under .local so that a failed run can be read afterwards.
    logs = ROOT / ".local" / "e2e-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    env = {
        **os.environ,
        "CITYPARK_DATABASE_URL": fresh_database,
        "CITYPARK_REDIS_URL": infra.redis_url.rsplit("/", 1)[0] + "/7",
        "CITYPARK_KAFKA_BOOTSTRAP": infra.kafka_bootstrap,
        "CITYPARK_BUS": "kafka",
        "CITYPARK_CACHE": "redis",
        "CITYPARK_JWT_SECRET": "e2e-" + os.urandom(16).hex(),
        "CITYPARK_LOTS_URL": f"http://127.0.0.1:{PORTS['lots']}",
        "CITYPARK_SESSIONS_URL": f"http://127.0.0.1:{PORTS['sessions']}",
        "CITYPARK_BILLING_URL": f"http://127.0.0.1:{PORTS['billing']}",
        "CITYPARK_PAYSANDBOX_URL": f"http://127.0.0.1:{PORTS['paysandbox']}",
        "CITYPARK_LOG_JSON": "true",
    }
    import redis

    redis.Redis.from_url(env["CITYPARK_REDIS_URL"]).flushdb()
    subprocess.run([CITYPARK, "migrate"], env=env, check=True, cwd=ROOT, capture_output=True)
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = logs / f"{name}.log"
        proc = subprocess.Popen(
            [CITYPARK, "run", *args],
            env=env,
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        procs.append((name, proc, log))
        return proc

    try:
        for name, port in PORTS.items():
            start(name, name, "--port", str(port))
        for d in SUZHOU_DISTRICTS:
            start(f"district-{d.code}", "district", d.code)
        for name, proc, log in procs:
            if name in PORTS:
                _wait_healthy(f"http://127.0.0.1:{PORTS[name]}", proc, log, 90)
        yield City(
            gateway=f"http://127.0.0.1:{PORTS['gateway']}",
            sandbox=f"http://127.0.0.1:{PORTS['paysandbox']}",
            env=env,
            logs=logs,
        )
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc, log in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                print(f"{name} did not stop on SIGTERM:\n{log.read_text()[-2000:]}")  # noqa: T201
