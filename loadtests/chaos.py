"""`make chaos`: the whole city on the real topology under a seeded fault schedule, then a verdict.

PostgreSQL, Redis and Kafka (deploy/local/infra.sh, on the run's own ports and state directory)
and every part of the city as its own process; parkings through the connector SDK at a steady
rate with duplicated and reordered deliveries; meanwhile parts are SIGKILLed and restarted, the
broker, Redis and PostgreSQL restarted, lots paused, poison published. After the traffic the run
waits for the city to drain, checks the invariants in the databases and writes
reports/chaos.json. Exit status 1 when an invariant fails, 2 when the run itself could not run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import httpx
import typer
from citypark_connector import sign_request
from kafka import KafkaProducer
from pydantic import SecretStr
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from loadtests.chaos_checks import (
    Check,
    Expectations,
    Poison,
    drain_state,
    drained,
    run_checks,
)
from loadtests.chaos_city import (
    DISTRICT_PARTS,
    HTTP_PARTS,
    ROOT,
    City,
    InfraConfig,
    Part,
    free_ports,
    fresh_state,
    infra,
)
from loadtests.chaos_traffic import Traffic, plan_parkings, seed_city
from services.gateway.gate import state as gate_state
from shared.db import make_engine, make_sessionmaker
from shared.events import EventType
from shared.pii_columns import bind_data_keys
from shared.settings import BusKind, CacheKind, Settings
from shared.topics import SESSIONS_CLOSED, SUZHOU_DISTRICTS, lot_events

console = Console()


def _first_snapshots(gateway: str, seeded: Any, *, deadline: float) -> None:
    """Wait until every car park's eligibility snapshot is complete (all enrolled hashed)."""
    with httpx.Client(timeout=30) as http:
        for lot in seeded.lots:
            while True:
                request = http.build_request("GET", f"{gateway}/v1/connector/eligibility")
                answer = http.send(sign_request(request, lot.key_id, seeded.private_pem))
                if answer.status_code == 200 and answer.json().get("complete", True):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{lot.key_id}: eligibility snapshot never completed")
                time.sleep(1.0)


app = typer.Typer(add_completion=False, help=__doc__)

KILLED_PARTS = ("gateway", "district", "sessions", "billing", "lots", "paysandbox")
INFRA_RESTARTS = ("kafka", "redis", "postgres")
POISON_KINDS = ("garbage", "bad-entry", "bad-closed")
PAUSE_S = 30.0


@dataclass
class Fault:
    at_s: float  # seconds after the traffic starts
    kind: str  # kill | restart | pause | poison
    target: str  # a part, a server, or a poison kind
    down_s: float = 0.0
    done: bool = False
    started_at_s: float | None = None
    took_s: float | None = None
    error: str | None = None

    @property
    def group(self) -> str:
        """The kind of fault, counted together: any district adapter is `kill district`."""
        return f"{self.kind} {'district' if self.target.startswith('district-') else self.target}"

    @property
    def label(self) -> str:
        extra = f" (down {self.down_s:.1f} s)" if self.down_s else ""
        return f"{self.kind} {self.target}{extra}"


def schedule(seed: int, window_s: float, rounds: int) -> list[Fault]:
    """The same seed and window give the same faults at the same times: `rounds` of each kind,
    shuffled, spread over the middle of the traffic."""
    rng = random.Random(f"chaos-faults-{seed}")
    faults: list[Fault] = []
    for _ in range(rounds):
        for part in KILLED_PARTS:
            target = rng.choice(DISTRICT_PARTS) if part == "district" else part
            faults.append(Fault(0, "kill", target, round(rng.uniform(0.5, 5.0), 1)))
        for server in INFRA_RESTARTS:
            faults.append(Fault(0, "restart", server, round(rng.uniform(1.0, 8.0), 1)))
        faults.append(Fault(0, "pause", "lots", PAUSE_S))
        for kind in POISON_KINDS:
            faults.append(Fault(0, "poison", kind))
    rng.shuffle(faults)
    start, end = 0.05 * window_s, 0.85 * window_s
    step = (end - start) / max(1, len(faults))
    for i, f in enumerate(faults):
        f.at_s = round(start + i * step + rng.uniform(0, 0.3 * step), 1)
    return faults


@dataclass
class Report:
    verdict: str = "error"
    seed: int = 0
    mode: str = "full"
    started_at: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    infra: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    traffic: dict[str, Any] = field(default_factory=dict)
    faults_planned: dict[str, int] = field(default_factory=dict)
    faults_injected: dict[str, int] = field(default_factory=dict)
    fault_log: list[dict[str, Any]] = field(default_factory=list)
    unexpected_exits: dict[str, list[int]] = field(default_factory=dict)
    # per part: how many warning/error log lines of each event, to know where to look
    log_digest: dict[str, dict[str, int]] = field(default_factory=dict)
    drain: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


class Interrupted(BaseException):
    """SIGTERM or Ctrl-C: stop, clean up, report what there is. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


STOP_REQUESTED = threading.Event()


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    STOP_REQUESTED.set()  # checked again by every wait, should a library swallow the raise
    raise Interrupted(signal.Signals(signum).name)


def _check_stop() -> None:
    if STOP_REQUESTED.is_set():
        raise Interrupted("stop requested")


class Run:
    def __init__(self, report: Report, out: Path, cfg: InfraConfig, seed: int) -> None:
        self.report = report
        self.out = out
        self.logs = out / "chaos"
        self.cfg = cfg
        self.seed = seed
        self.infra_log = self.logs / "infra.log"
        self.city: City | None = None
        self.traffic: Traffic | None = None
        self.poison: list[Poison] = []
        self.status = ""

    # -- faults ------------------------------------------------------------------------------

    def idle(self, seconds: float) -> None:
        """Wait, restarting meanwhile any part that died on its own."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            _check_stop()
            self.watch()
            time.sleep(min(0.5, left))

    def watch(self) -> None:
        assert self.city is not None

        def died(part: Part, code: int) -> None:
            console.log(f"[red]{part.name} exited on its own (code {code}); restarted[/red]")

        self.city.watch(died)

    def inject(self, fault: Fault) -> None:
        assert self.city is not None
        city = self.city
        if fault.kind == "kill":
            part = city.parts[fault.target]
            city.kill(part)
            self.idle(fault.down_s)
            city.start(part)
            city.wait_healthy(part, 90)
        elif fault.kind == "restart":
            infra(self.cfg, "restart", fault.target, str(fault.down_s), log=self.infra_log)
        elif fault.kind == "pause":
            part = city.parts[fault.target]
            city.pause(part)
            try:
                self.idle(fault.down_s)
            finally:
                city.resume(part)
        elif fault.kind == "poison":
            self.publish_poison(fault.target)
        else:
            raise ValueError(fault.kind)

    def publish_poison(self, kind: str) -> None:
        """A record no consumer can ever handle, marked so its dead letters can be told apart."""
        n = len(self.poison)
        marker = f"chaos-poison-{self.seed}-{n}"
        district = SUZHOU_DISTRICTS[n % len(SUZHOU_DISTRICTS)].code
        envelope = {
            "specversion": "1.0",
            "id": marker,
            "source": "chaos",
            "time": "2026-01-01T00:00:00+00:00",
            "datacontenttype": "application/json",
        }
        groups: tuple[str, ...]
        if kind == "garbage":  # not JSON at all
            topic, groups = lot_events(district), (f"citypark-district-{district}",)
            value = f"\x00\x01 {marker} {{not json".encode()
        elif kind == "bad-entry":  # a valid envelope, a payload no schema accepts
            topic, groups = lot_events(district), (f"citypark-district-{district}",)
            value = json.dumps(
                {**envelope, "type": EventType.connector_entry, "data": {"marker": marker}}
            ).encode()
        else:  # bad-closed: read by billing, lots and the notifications
            topic = SESSIONS_CLOSED
            groups = ("citypark-billing", "citypark-lots", "citypark-billing-notifications")
            value = json.dumps(
                {**envelope, "type": EventType.session_closed,
                 "data": {"session_id": marker, "exited_at": "never"}}
            ).encode()  # fmt: skip
        producer = KafkaProducer(bootstrap_servers=[self.cfg.kafka_bootstrap], acks="all")
        try:
            producer.send(topic, key=marker.encode(), value=value).get(timeout=30)
        finally:
            producer.close(timeout=5)
        self.poison.append(Poison(marker, kind, topic, groups))

    def run_faults(self, faults: list[Fault], t0: float, progress: Progress, task: Any) -> None:
        for fault in faults:
            wait = t0 + fault.at_s - time.monotonic()
            if wait > 0:
                progress.update(task, description=f"next: {fault.label} in {wait:.0f} s")
                self.idle(wait)
            progress.update(task, description=f"[yellow]{fault.label}[/yellow]")
            fault.started_at_s = round(time.monotonic() - t0, 1)
            began = time.monotonic()
            try:
                self.inject(fault)
                fault.done = True
            except Interrupted:
                raise
            except Exception as exc:
                fault.error = str(exc)[-1500:]
                console.log(f"[red]{fault.label} failed: {str(exc)[-500:]}[/red]")
            fault.took_s = round(time.monotonic() - began, 1)
            progress.advance(task)
            _check_stop()
        progress.update(task, description="faults done")


def _config_env(cfg: InfraConfig, ports: dict[str, int], log_level: str) -> dict[str, str]:
    def url(name: str) -> str:
        return f"http://127.0.0.1:{ports[name]}"

    return {
        **os.environ,
        "CITYPARK_DATABASE_URL": cfg.database_url,
        "CITYPARK_REDIS_URL": cfg.redis_url,
        "CITYPARK_KAFKA_BOOTSTRAP": cfg.kafka_bootstrap,
        "CITYPARK_BUS": "kafka",
        "CITYPARK_CACHE": "redis",
        "CITYPARK_JWT_SECRET": os.urandom(24).hex(),
        "CITYPARK_GATEWAY_URL": url("gateway"),
        "CITYPARK_LOTS_URL": url("lots"),
        "CITYPARK_SESSIONS_URL": url("sessions"),
        "CITYPARK_BILLING_URL": url("billing"),
        "CITYPARK_PAYSANDBOX_URL": url("paysandbox"),
        "CITYPARK_LOG_JSON": "true",
        "CITYPARK_LOG_LEVEL": log_level,
        # enough for every gate's replays after an outage (the default suits real car parks)
        "CITYPARK_CONNECTOR_RATE_LIMIT_REQUESTS": "200",
    }


def _summary_table(checks: list[Check]) -> Table:
    table = Table(title="chaos run: invariants", show_lines=False)
    table.add_column("check")
    table.add_column("ok")
    table.add_column("figures")
    for c in checks:
        figures = ", ".join(
            f"{k} {v}" for k, v in c.figures.items() if not isinstance(v, dict) or v
        )
        table.add_row(c.name, "[green]yes[/green]" if c.ok else "[red]NO[/red]", figures)
    return table


def _sdk_log_to(path: Path) -> None:
    """The gates' SDK warnings (retries, offline decisions) go to a file, not the terminal."""
    sdk = logging.getLogger("citypark_connector")
    for h in list(sdk.handlers):
        sdk.removeHandler(h)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(levelname)s %(message)s"))
    sdk.addHandler(handler)
    sdk.setLevel(logging.INFO)
    sdk.propagate = False


def _log_digest(logs: Path) -> dict[str, dict[str, int]]:
    """Warning and error lines per part, by event name (JSON logs) or logger (the rest)."""
    digest: dict[str, dict[str, int]] = {}
    for path in sorted(logs.glob("*.log")):
        if path.name in ("infra.log", "redis.log", "postgres.log", "kafka-server.log"):
            continue
        counts: Counter[str] = Counter()
        with path.open(errors="replace") as f:
            for line in f:
                if line.startswith("{"):
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if entry.get("level") in ("warning", "error", "critical"):
                        counts[f"{entry['level']} {entry.get('event')}"] += 1
                elif line.startswith(("WARNING:", "ERROR:")) or " WARNING " in line:
                    head = " ".join(" ".join(line.split(":", 2)[:2]).split())
                    counts[head.split(" citypark")[0][:80]] += 1
        if counts:
            digest[path.stem] = dict(counts.most_common(12))
    return digest


def _copy_infra_logs(cfg: InfraConfig, logs: Path) -> None:
    """The servers' own logs beside the parts' (tails: Kafka's can be large)."""
    local = cfg.local_dir
    for src, name in (
        (local / "redis" / "redis.log", "redis.log"),
        (local / "kafka" / "logs" / "server.log", "kafka-server.log"),
        (local / "pg" / "postgres.log", "postgres.log"),
    ):
        try:
            data = src.read_bytes()[-2_000_000:]
            (logs / name).write_bytes(data)
        except OSError:
            pass


def chaos(
    *,
    sessions: int,
    rate: float,
    seed: int,
    quick: bool,
    out: Path,
    cfg: InfraConfig,
    rounds: int,
    lots_per_district: int,
    drivers: int,
    drain_timeout_s: float,
    log_level: str,
    keep_infra: bool,
) -> Report:
    report = Report(
        seed=seed, mode="quick" if quick else "full", started_at=time.strftime("%FT%T%z")
    )
    window = sessions / rate
    faults = schedule(seed, window, rounds)
    report.faults_planned = dict(Counter(f.group for f in faults))
    console.rule(f"chaos run: seed {seed}, {sessions:,} parkings at {rate:g}/s (~{window:.0f} s)")
    console.print("fault schedule (seconds after the traffic starts):")
    for f in faults:
        console.print(f"  {f.at_s:7.1f}  {f.label}")
    logs = out / "chaos"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    _sdk_log_to(logs / "sdk.log")
    run = Run(report, out, cfg, seed)
    stop = threading.Event()
    traffic_thread: threading.Thread | None = None
    t_start = time.monotonic()
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        report.infra = asdict(cfg)
        with console.status("infrastructure up (infra.sh up) ..."):
            report.timings_s["infra_up"] = round(infra(cfg, "up", log=run.infra_log), 1)
            fresh_state(cfg)
        ports = dict(zip(HTTP_PARTS, free_ports(len(HTTP_PARTS)), strict=True))
        report.ports = ports
        env = _config_env(cfg, ports, log_level)
        city = run.city = City.build(env, logs, ports)
        with console.status("migrating and starting 15 processes ..."):
            t = time.monotonic()
            city.citypark("migrate")
            city.start_all()
            report.timings_s["city_start"] = round(time.monotonic() - t, 1)
        settings = Settings.model_validate(
            {
                "database_url": cfg.database_url,
                "redis_url": cfg.redis_url,
                "kafka_bootstrap": cfg.kafka_bootstrap,
                "bus": BusKind.kafka,
                "cache": CacheKind.redis,
                "jwt_secret": SecretStr(env["CITYPARK_JWT_SECRET"]),
            }
        )
        # Plates and phones are encrypted at rest under the city's data keys.
        engine = bind_data_keys(make_engine(cfg.database_url), settings)
        factory = make_sessionmaker(engine)
        rng = random.Random(f"chaos-city-{seed}")
        gateway = f"http://127.0.0.1:{ports['gateway']}"
        with console.status("seeding car parks and drivers ..."):
            t = time.monotonic()
            token = city.citypark("admin", "token", "--role", "admin").splitlines()[-1]
            with httpx.Client(
                base_url=gateway, timeout=30, headers={"Authorization": f"Bearer {token}"}
            ) as admin:
                seeded = seed_city(
                    admin,
                    factory,
                    settings,
                    lots_per_district=lots_per_district,
                    n_drivers=drivers,
                    rng=rng,
                )
            import redis as redis_lib

            r = redis_lib.Redis.from_url(cfg.redis_url)
            last = max(seeded.enrolled)
            deadline = time.monotonic() + 120
            while gate_state.driver_of(r, settings, last, "blue") is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("the gate never learnt the seeded drivers (account events)")
                time.sleep(0.5)
            report.timings_s["seed"] = round(time.monotonic() - t, 1)
        engine.dispose()
        parkings = plan_parkings(seeded, sessions, 0.6, rng)
        traffic = run.traffic = Traffic(gateway, seeded, parkings, rate, logs / "outbox")
        with console.status("the gates take their first eligibility snapshots ..."):
            # A city starts its gates with the enrolled drivers hashed for them; a cold start
            # under full traffic would send enrolled drivers to pay at the gate.
            t = time.monotonic()
            _first_snapshots(gateway, seeded, deadline=t + 300)
            for client in traffic.clients:
                client.refresh_eligibility()
            report.timings_s["first_snapshots"] = round(time.monotonic() - t, 1)
        progress = Progress(
            TextColumn("{task.description:<44}"),
            BarColumn(),
            TextColumn("{task.completed:>6.0f}/{task.total:<6.0f}"),
            TimeElapsedColumn(),
            console=console,
        )
        with progress:
            t_task = progress.add_task("parkings sent", total=len(parkings))
            f_task = progress.add_task("faults", total=len(faults))
            t0 = time.monotonic()
            traffic_thread = threading.Thread(
                target=traffic.run, args=(stop, progress, t_task), name="chaos-traffic"
            )
            traffic_thread.start()
            run.run_faults(faults, t0, progress, f_task)
            while traffic_thread.is_alive():
                run.idle(0.5)
            if traffic.error is not None:
                raise RuntimeError(f"traffic failed: {traffic.error!r}") from traffic.error
            report.timings_s["traffic_and_faults"] = round(time.monotonic() - t0, 1)
            # drain: first the gates' outboxes, then the city
            d_task = progress.add_task("draining: gates' outboxes", total=len(parkings))
            t = time.monotonic()
            left = traffic.flush(min(120.0, drain_timeout_s))
            report.drain["sdk_outbox_left"] = left
            progress.update(d_task, description="draining: the city")
            check_engine = bind_data_keys(
                create_engine(cfg.database_url, poolclass=NullPool), settings
            )
            state: dict[str, int] = {}
            deadline = t + drain_timeout_s
            while time.monotonic() < deadline:
                _check_stop()
                run.watch()
                try:
                    state = drain_state(check_engine, len(parkings))
                except Exception as exc:  # the database may be restarting under a late fault
                    state = {"error": 1}
                    console.log(f"drain query failed: {exc!r}")
                if state and "error" not in state:
                    progress.update(d_task, completed=state["closed"])
                    if drained(state):
                        break
                time.sleep(1.0)
            report.drain.update(
                {
                    "drained": bool(state) and "error" not in state and drained(state),
                    "seconds": round(time.monotonic() - t, 1),
                    "bound_s": drain_timeout_s,
                    "last_state": state,
                }
            )
        report.traffic = traffic.figures()
        report.fault_log = [asdict(f) for f in faults]
        report.faults_injected = dict(Counter(f.group for f in faults if f.done))
        report.unexpected_exits = {
            p.name: p.unexpected_exits for p in city.parts.values() if p.unexpected_exits
        }
        checks = run_checks(
            check_engine,
            Expectations(seeded.lots, parkings, traffic.outcomes, run.poison),
            traffic.pending(),
        )
        checks.append(
            Check(
                "the city drained in time",
                bool(report.drain["drained"]),
                {"seconds": report.drain["seconds"], "bound_s": drain_timeout_s,
                 **state},
            )
        )  # fmt: skip
        failed_faults = [f.label for f in faults if not f.done]
        checks.append(
            Check(
                "every planned fault was injected",
                not failed_faults,
                {"planned": len(faults), "injected": sum(f.done for f in faults)},
                f"not injected: {failed_faults}" if failed_faults else "",
            )
        )
        checks.append(
            Check(
                "no part died unless killed",
                not report.unexpected_exits,
                {"parts_that_died_on_their_own": len(report.unexpected_exits)},
                f"exit codes by part: {report.unexpected_exits}" if report.unexpected_exits else "",
            )
        )
        report.checks = [asdict(c) for c in checks]
        report.log_digest = _log_digest(logs)
        report.verdict = "pass" if all(c.ok for c in checks) else "fail"
        console.print(_summary_table(checks))
        for c in checks:
            if not c.ok and c.detail:
                console.print(f"[red]{c.name}[/red]: {c.detail}")
    except Interrupted as exc:
        report.error = f"interrupted by {exc}"
        report.verdict = "error"
    except Exception as exc:
        report.error = "".join(traceback.format_exception(exc))[-5000:]
        report.verdict = "error"
        console.print(f"[red]the run could not complete:[/red] {exc}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop.set()
        # From here on nothing interrupts the cleanup: a second Ctrl-C is ignored.
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        try:
            if run.traffic is not None:
                run.traffic.close()
            if traffic_thread is not None:
                traffic_thread.join(timeout=30)
            if run.city is not None:
                killed = run.city.stop_all()
                if killed:
                    console.log(f"did not stop on SIGTERM, killed: {', '.join(killed)}")
            _copy_infra_logs(cfg, logs)
            if cfg.own and not keep_infra:
                with console.status("stopping the run's infrastructure ..."):
                    infra(cfg, "down", log=run.infra_log)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        report.timings_s["total"] = round(time.monotonic() - t_start, 1)
        out.mkdir(parents=True, exist_ok=True)
        (out / "chaos.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    return report


@app.command()
def main(
    quick: Annotated[
        bool, typer.Option(help="1,000 parkings, one fault of each kind: under 6 minutes.")
    ] = False,
    sessions: Annotated[
        int | None, typer.Option(min=10, help="Parkings to send (default 5,000; quick 1,000).")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(min=0.1, help="Parkings per second (default 12; quick 7).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same parkings and fault schedule.")] = 1,
    rounds: Annotated[
        int | None, typer.Option(min=1, help="Faults of each kind (default 2; quick 1).")
    ] = None,
    lots_per_district: Annotated[int, typer.Option(min=1, help="Car parks per district.")] = 2,
    drivers: Annotated[
        int | None, typer.Option(min=10, help="Enrolled drivers (default 600; quick 200).")
    ] = None,
    drain_timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait for the city to drain (300; quick 120).")
    ] = None,
    pg_port: Annotated[int, typer.Option(help="The run's PostgreSQL port.")] = 25432,
    redis_port: Annotated[int, typer.Option(help="The run's Redis port.")] = 26379,
    kafka_port: Annotated[int, typer.Option(help="The run's Kafka port.")] = 29092,
    infra_dir: Annotated[
        str,
        typer.Option(
            help="infra.sh state directory; the run stops the servers at the end unless it is "
            "the shared `.local` (or --keep-infra).",
        ),
    ] = ".local/chaos",
    keep_infra: Annotated[bool, typer.Option(help="Leave the run's servers running.")] = False,
    log_level: Annotated[str, typer.Option(help="The parts' log level.")] = "INFO",
    out: Annotated[Path, typer.Option(help="Where chaos.json and chaos/ go.")] = ROOT / "reports",
) -> None:
    """Run the city under chaos and check it; reports/chaos.json, logs under reports/chaos/."""
    sessions = sessions or (1_000 if quick else 5_000)
    rate = rate or (7.0 if quick else 12.0)
    cfg = InfraConfig(pg_port, redis_port, kafka_port, infra_dir)
    report = chaos(
        sessions=sessions,
        rate=rate,
        seed=seed,
        quick=quick,
        out=out,
        cfg=cfg,
        rounds=rounds or (1 if quick else 2),
        lots_per_district=lots_per_district,
        drivers=drivers or (200 if quick else 600),
        drain_timeout_s=drain_timeout or (120.0 if quick else 300.0),
        log_level=log_level,
        keep_infra=keep_infra,
    )
    checks = report.checks
    passed = sum(c["ok"] for c in checks)
    injected = sum(report.faults_injected.values())
    line = (
        f"chaos {report.verdict.upper()}: seed {seed}, "
        f"{report.traffic.get('parkings_sent', 0):,} parkings, {injected} faults injected, "
        f"drain {report.drain.get('seconds', '-')} s, {passed}/{len(checks)} checks passed, "
        f"{report.timings_s.get('total', 0):.0f} s in all -> {out / 'chaos.json'}"
    )
    console.print(f"[{'green' if report.verdict == 'pass' else 'red'}]{line}[/]")
    if report.error:
        console.print(f"[red]{report.error.splitlines()[-1] if report.error else ''}[/red]")
    raise typer.Exit(0 if report.verdict == "pass" else (1 if report.verdict == "fail" else 2))


if __name__ == "__main__":
    sys.exit(app())
