"""Start the real topology as separate processes (as `make up` does), for tests and benchmarks:
1 gateway, 10 district adapters, sessions, billing, lots and the payment sandbox."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.topics import SUZHOU_DISTRICTS

ROOT = Path(__file__).resolve().parents[1]
CITYPARK = str(Path(sys.executable).parent / "citypark")


@dataclass(frozen=True)
class Ports:
    gateway: int = 18000
    lots: int = 18001
    sessions: int = 18002
    billing: int = 18003
    paysandbox: int = 18090
    vehicleregistry: int = 18091

    def of(self, name: str) -> int:
        return int(getattr(self, name))


SERVICES = ("gateway", "lots", "sessions", "billing", "paysandbox", "vehicleregistry")


@dataclass
class Topology:
    env: dict[str, str]
    ports: Ports
    logs: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    @property
    def sandbox(self) -> str:
        return f"http://127.0.0.1:{self.ports.paysandbox}"

    @property
    def registry(self) -> str:
        """The sandbox vehicle registry (ownership proofs)."""
        return f"http://127.0.0.1:{self.ports.vehicleregistry}"

    def citypark(self, *args: str) -> str:
        out = subprocess.run(
            [CITYPARK, *args], env=self.env, capture_output=True, text=True, check=True, cwd=ROOT
        )
        return out.stdout.strip()

    def admin_token(self, role: str = "admin") -> str:
        return self.citypark("admin", "token", "--role", role).splitlines()[-1]


def real_env(database_url: str, redis_url: str, kafka: str, ports: Ports) -> dict[str, str]:
    return {
        **os.environ,
        "CITYPARK_DATABASE_URL": database_url,
        "CITYPARK_REDIS_URL": redis_url,
        "CITYPARK_KAFKA_BOOTSTRAP": kafka,
        "CITYPARK_BUS": "kafka",
        "CITYPARK_CACHE": "redis",
        "CITYPARK_JWT_SECRET": os.environ.get("CITYPARK_JWT_SECRET") or os.urandom(24).hex(),
        "CITYPARK_GATEWAY_URL": f"http://127.0.0.1:{ports.gateway}",
        "CITYPARK_LOTS_URL": f"http://127.0.0.1:{ports.lots}",
        "CITYPARK_SESSIONS_URL": f"http://127.0.0.1:{ports.sessions}",
        "CITYPARK_BILLING_URL": f"http://127.0.0.1:{ports.billing}",
        "CITYPARK_PAYSANDBOX_URL": f"http://127.0.0.1:{ports.paysandbox}",
        "CITYPARK_VEHICLE_REGISTRY_URL": f"http://127.0.0.1:{ports.vehicleregistry}",
        "CITYPARK_LOG_JSON": "true",
        # Simulated drivers read their codes from the sandbox SMS outbox and all sign in from
        # this machine's one address, so the per-address sign-in limit must not apply.
        "CITYPARK_SANDBOX_MODE": "true",
        "CITYPARK_SIGNIN_IP_LIMIT": "1000000",
        "CITYPARK_SIGNIN_GLOBAL_LIMIT": "1000000",
    }


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


@contextmanager
def running_city(
    env: dict[str, str], logs: Path, ports: Ports | None = None, log_level: str = "INFO"
) -> Iterator[Topology]:
    """Migrate, start every part, wait until healthy; SIGTERM all on exit."""
    ports = ports or Ports()
    logs.mkdir(parents=True, exist_ok=True)
    env = {**env, "CITYPARK_LOG_LEVEL": log_level}
    migrated = subprocess.run(
        [CITYPARK, "migrate"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if migrated.returncode:
        raise RuntimeError(f"citypark migrate failed:\n{migrated.stderr[-3000:]}")
    topo = Topology(env=env, ports=ports, logs=logs)

    def start(name: str, *args: str) -> None:
        log = logs / f"{name}.log"
        proc = subprocess.Popen(
            [CITYPARK, "run", *args],
            env=env,
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        topo.procs.append((name, proc))

    try:
        for name in SERVICES:
            start(name, name, "--port", str(ports.of(name)))
        for d in SUZHOU_DISTRICTS:
            start(f"district-{d.code}", "district", d.code)
        for name, proc in topo.procs:
            if name in SERVICES:
                _wait_healthy(f"http://127.0.0.1:{ports.of(name)}", proc, logs / f"{name}.log", 90)
        yield topo
    finally:
        for _, proc in topo.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in topo.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                print(f"{name} did not stop on SIGTERM")
