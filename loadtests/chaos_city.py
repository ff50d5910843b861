"""The chaos run's city: its own infrastructure (through deploy/local/infra.sh) and every part of
the real topology as a child process that can be killed, paused and restarted one at a time."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from shared.topics import SUZHOU_DISTRICTS, all_topics

ROOT = Path(__file__).resolve().parents[1]
CITYPARK = str(Path(sys.executable).parent / "citypark")
INFRA_SH = ROOT / "deploy" / "local" / "infra.sh"
HTTP_PARTS = ("gateway", "lots", "sessions", "billing", "paysandbox")
DISTRICT_PARTS = tuple(f"district-{d.code}" for d in SUZHOU_DISTRICTS)
# Every consumer group of the city (services/*/consumers.py, the district adapters).
CONSUMER_GROUPS = (
    "citypark-gateway-state",
    "citypark-lots",
    "citypark-sessions",
    "citypark-billing",
    "citypark-billing-notifications",
    *(f"citypark-district-{d.code}" for d in SUZHOU_DISTRICTS),
)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills it when the harness dies, even by SIGKILL,
    so no part of a chaos city outlives its run."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on right now (the kernel picks them), distinct."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class InfraConfig:
    """Where the run's PostgreSQL, Redis and Kafka are, and the infra.sh state directory."""

    pg_port: int
    redis_port: int
    kafka_port: int
    state_dir: str  # CITYPARK_INFRA_DIR, relative to the repository or absolute
    database: str = "citypark_chaos"
    redis_db: int = 13

    @property
    def env(self) -> dict[str, str]:
        return {
            "CITYPARK_PG_PORT": str(self.pg_port),
            "CITYPARK_REDIS_PORT": str(self.redis_port),
            "CITYPARK_KAFKA_PORT": str(self.kafka_port),
            "CITYPARK_INFRA_DIR": self.state_dir,
            "CITYPARK_PYTHON": sys.executable,
        }

    @property
    def database_url(self) -> str:
        return f"postgresql+psycopg://citypark:citypark@127.0.0.1:{self.pg_port}/{self.database}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/{self.redis_db}"

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def own(self) -> bool:
        """A state directory of its own (not the shared `.local`): the run may stop it."""
        return Path(self.state_dir).resolve() != (ROOT / ".local").resolve()

    @property
    def local_dir(self) -> Path:
        p = Path(self.state_dir)
        return p if p.is_absolute() else ROOT / p


def infra(config: InfraConfig, *args: str, log: Path, timeout_s: float = 240) -> float:
    """Run `infra.sh ARGS` for this run's servers; seconds it took. Raises with its output."""
    t0 = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n=== infra.sh {' '.join(args)} at {time.strftime('%H:%M:%S')}\n")
        out.flush()
        done = subprocess.run(
            ["bash", str(INFRA_SH), *args],
            env={**os.environ, **config.env},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            check=False,
        )
    if done.returncode:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"infra.sh {' '.join(args)} failed ({done.returncode}):\n{tail}")
    return time.monotonic() - t0


def fresh_state(config: InfraConfig) -> None:
    """A fresh database, an empty Redis database, and every consumer group moved past what
    earlier runs (or test suites) left in the topics: the checks then see this run alone."""
    with psycopg.connect(
        host="127.0.0.1",
        port=config.pg_port,
        user="citypark",
        password="citypark",
        dbname="postgres",
        autocommit=True,
        connect_timeout=10,
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{config.database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{config.database}" OWNER citypark')
    redis.Redis.from_url(config.redis_url, socket_timeout=10).flushdb()
    topics = all_topics()
    for group in CONSUMER_GROUPS:
        consumer = KafkaConsumer(
            bootstrap_servers=[config.kafka_bootstrap],
            group_id=group,
            enable_auto_commit=False,
            request_timeout_ms=30_000,
        )
        try:
            partitions = [
                TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()
            ]
            ends = consumer.end_offsets(partitions)
            consumer.commit({tp: OffsetAndMetadata(ends[tp], "", -1) for tp in partitions})
        finally:
            consumer.close()


@dataclass
class Part:
    """One process of the city. `expected_down` is set while the harness itself holds it down."""

    name: str
    argv: list[str]
    log: Path
    port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    expected_down: bool = False
    unexpected_exits: list[int] = field(default_factory=list)

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class City:
    """Starts, kills, pauses and restarts the parts. Call only from the main thread: each
    child dies with the thread that started it (PR_SET_PDEATHSIG)."""

    env: dict[str, str]
    logs: Path
    ports: dict[str, int]
    parts: dict[str, Part] = field(default_factory=dict)

    @classmethod
    def build(cls, env: dict[str, str], logs: Path, ports: dict[str, int]) -> City:
        city = cls(env=env, logs=logs, ports=ports)
        for name in HTTP_PARTS:
            city.parts[name] = Part(
                name,
                [CITYPARK, "run", name, "--port", str(ports[name])],
                logs / f"{name}.log",
                ports[name],
            )
        for d in SUZHOU_DISTRICTS:
            name = f"district-{d.code}"
            city.parts[name] = Part(
                name, [CITYPARK, "run", "district", d.code], logs / f"{name}.log"
            )
        return city

    def citypark(self, *args: str, timeout_s: float = 120) -> str:
        done = subprocess.run(
            [CITYPARK, *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode:
            raise RuntimeError(f"citypark {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done.stdout.strip()

    def start(self, part: Part) -> None:
        part.starts += 1
        with part.log.open("ab") as out:
            banner = f"\n=== chaos: start #{part.starts} at {time.strftime('%H:%M:%S')}\n"
            out.write(banner.encode())
        with part.log.open("ab") as out:
            part.proc = subprocess.Popen(
                part.argv,
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the harness, which stops the parts
                preexec_fn=_die_with_parent,
            )
        part.expected_down = False

    def start_all(self, timeout_s: float = 120) -> None:
        for part in self.parts.values():
            self.start(part)
        for part in self.parts.values():
            self.wait_healthy(part, timeout_s)

    def wait_healthy(self, part: Part, timeout_s: float = 90) -> float:
        """Seconds until /healthz answers 200 (adapters: until the process is up)."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            if part.proc is None or part.proc.poll() is not None:
                tail = part.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{part.name} exited while starting:\n{tail}")
            if part.url is None:
                return time.monotonic() - t0
            try:
                if httpx.get(part.url + "/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        tail = part.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{part.name} not healthy within {timeout_s:.0f} s:\n{tail}")

    def kill(self, part: Part) -> None:
        """SIGKILL: no shutdown hook runs, whatever was in flight is lost."""
        part.expected_down = True
        if part.proc is not None and part.proc.poll() is None:
            part.proc.send_signal(signal.SIGCONT)  # a paused process must not stay a zombie
            part.proc.kill()
            part.proc.wait(timeout=30)

    def pause(self, part: Part) -> None:
        if part.proc is not None:
            part.expected_down = True
            part.proc.send_signal(signal.SIGSTOP)

    def resume(self, part: Part) -> None:
        if part.proc is not None:
            part.proc.send_signal(signal.SIGCONT)
            part.expected_down = False

    def watch(self, on_exit: Callable[[Part, int], None]) -> None:
        """Restart any part that died without the harness killing it, and say so."""
        for part in self.parts.values():
            if part.expected_down or part.proc is None:
                continue
            code = part.proc.poll()
            if code is not None:
                part.unexpected_exits.append(code)
                on_exit(part, code)
                self.start(part)

    def stop_all(self, timeout_s: float = 20) -> list[str]:
        """SIGTERM everything, then SIGKILL what is still there; names of those killed."""
        alive = [p for p in self.parts.values() if p.proc is not None and p.proc.poll() is None]
        for part in alive:
            assert part.proc is not None
            part.expected_down = True
            part.proc.send_signal(signal.SIGCONT)
            part.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        killed = []
        for part in alive:
            assert part.proc is not None
            try:
                part.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                part.proc.kill()
                part.proc.wait(timeout=10)
                killed.append(part.name)
        return killed
