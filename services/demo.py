"""Demo city for `make run`: operators, car parks in every district, enrolled drivers, and
simulated gate traffic through the connector SDK, so parkings and charges appear at once."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import structlog
from citypark_connector import ConnectorClient, ConnectorError, EventRejected, generate_keypair
from fastapi import FastAPI
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.billing.driver import service as drivers
from services.billing.driver.models import Driver, PaymentAccount
from services.billing.vehicle.models import Vehicle, VehicleStatus
from services.lots import service as lots
from services.lots.models import Lot
from services.lots.schemas import EXAMPLE_TARIFF, Location, LotCreate, OperatorCreate, PublicKeyIn
from services.paysandbox.models import Agreement
from shared.auth import Admin, Role
from shared.db import transaction
from shared.pii_columns import index_in
from shared.runtime import Runtime
from shared.timeutil import utcnow
from shared.topics import SUZHOU_DISTRICTS

log = structlog.get_logger(__name__)

KEYS_DIR = Path(".local/demo-keys")
DEMO_OUTBOX = Path(".local/demo-outbox")
# Rough centres of each district, so `GET /v1/lots?near=` finds something real.
CENTRES = {
    "gusu": (31.3017, 120.5853),
    "huqiu": (31.2983, 120.4338),
    "wuzhong": (31.2624, 120.6318),
    "xiangcheng": (31.3690, 120.6422),
    "wujiang": (31.1382, 120.6455),
    "sip": (31.3246, 120.7235),
    "changshu": (31.6539, 120.7522),
    "zhangjiagang": (31.8752, 120.5556),
    "kunshan": (31.3846, 120.9808),
    "taicang": (31.4576, 121.1300),
}
LOTS_PER_DISTRICT = 2
SEEDER = Admin(id="demo-seed", role=Role.admin)  # the audit log names who created the demo
DEMO_DRIVERS = 12
PROVINCE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def demo_plate(n: int) -> str:
    return f"苏E{PROVINCE_LETTERS[n % len(PROVINCE_LETTERS)]}{n % 10000:04d}"


def seed(rt: Runtime, keys_dir: Path = KEYS_DIR) -> list[dict[str, Any]]:
    """Idempotent: what exists (by lot code, by phone) is kept."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    manifest = keys_dir / "lots.json"
    known: list[dict[str, Any]] = json.loads(manifest.read_text()) if manifest.exists() else []
    with transaction(rt.sessionmaker) as db:
        existing = set(db.scalars(select(Lot.code)))
        if not all(entry["lot_code"] in existing for entry in known):
            known = []
        if not known:
            operators = [
                lots.create_operator(
                    db,
                    OperatorCreate(
                        name=name, commission_bps=bps, settlement_account=f"62220202{i:08d}"
                    ),
                    SEEDER,
                )
                for i, (name, bps) in enumerate(
                    [("苏州城市停车运营", 500), ("园区智慧停车", 600), ("吴中泊车", 450)]
                )
            ]
            rng = random.Random(7)
            for d in SUZHOU_DISTRICTS:
                lat, lng = CENTRES[d.code]
                for i in range(LOTS_PER_DISTRICT):
                    code = f"{d.code[:3].upper()}-{i + 1:04d}"
                    if code in existing:
                        continue
                    private_pem, public_pem = generate_keypair()
                    key_id = f"{code.lower()}-k1"
                    lot = lots.create_lot(
                        db,
                        LotCreate(
                            code=code,
                            name=f"{d.name}停车场{i + 1}",
                            district=d.code,
                            operator_id=operators[(i + len(known)) % len(operators)].id,
                            capacity=rng.randint(80, 600),
                            location=Location(
                                lat=lat + rng.uniform(-0.01, 0.01),
                                lng=lng + rng.uniform(-0.01, 0.01),
                            ),
                            postpay_enabled=True,
                            public_keys=[PublicKeyIn(key_id=key_id, public_key_pem=public_pem)],
                            tariff=EXAMPLE_TARIFF,
                        ),
                        SEEDER,
                        cache=rt.redis,
                    )
                    (keys_dir / f"{key_id}.key").write_text(private_pem)
                    known.append(
                        {
                            "lot_id": lot.id,
                            "lot_code": code,
                            "district": d.code,
                            "key_id": key_id,
                            "capacity": lot.capacity,
                        }
                    )
        for n in range(DEMO_DRIVERS):
            phone = f"139000{n:05d}"
            by_phone = Driver.phone_bidx == index_in(db, "phone", phone)
            if existing_driver := db.scalar(select(Driver).where(by_phone)):
                _verify_demo_vehicles(db, rt, existing_driver)
                continue
            driver = Driver(phone=phone)
            agreement = Agreement(
                agreement_no=f"AGR-DEMO{n:04d}",
                holder=f"demo driver {n}",
                balance_fen=200_000 if n % 6 else 300,
                behaviour="ok" if n % 6 else "insufficient_funds",
            )
            db.add_all([driver, agreement])
            db.flush()
            # The demo's own cars: proven as if their owners had shown the registration.
            db.add(
                Vehicle(
                    driver_id=driver.id,
                    plate=demo_plate(n),
                    plate_color="blue",
                    status=VehicleStatus.verified,
                    verified_at=demo_verified_at(),
                )
            )
            db.add(
                PaymentAccount(
                    driver_id=driver.id,
                    provider="sandbox",
                    agreement_no=agreement.agreement_no,
                    masked_account=f"sandbox ****{agreement.agreement_no[-4:]}",
                )
            )
            db.flush()
            drivers.publish_account_state(db, rt.settings, driver)
    manifest.write_text(json.dumps(known, indent=1))
    log.info("demo.seeded", lots=len(known), drivers=DEMO_DRIVERS)
    return known


def demo_verified_at() -> datetime:
    """Demo cars count as proven a while ago: the simulated traffic reports stays up to the 7
    days late the city accepts, and their drivers should see those parkings too."""
    return utcnow() - timedelta(days=8)


def _verify_demo_vehicles(db: Session, rt: Runtime, driver: Driver) -> None:
    """Demo drivers seeded before vehicles needed proof of ownership: prove theirs now."""
    pending = list(
        db.scalars(
            select(Vehicle).where(
                Vehicle.driver_id == driver.id, Vehicle.status == VehicleStatus.unverified
            )
        )
    )
    for vehicle in pending:
        vehicle.status, vehicle.verified_at = VehicleStatus.verified, demo_verified_at()
    if pending:
        db.flush()
        drivers.publish_account_state(db, rt.settings, driver)


# Arrivals per hour of day (Asia/Shanghai), relative: a weekday in a Chinese city centre —
# quiet nights, the morning commute, a lunchtime bump and the long evening peak.
ARRIVAL_CURVE = (
    0.15, 0.1, 0.08, 0.06, 0.08, 0.2, 0.5, 1.3, 1.9, 1.5, 1.1, 1.0,
    1.2, 1.1, 1.0, 1.0, 1.2, 1.6, 1.8, 1.5, 1.2, 0.9, 0.6, 0.3,
)  # fmt: skip
SHANGHAI = ZoneInfo("Asia/Shanghai")
# Serials with O/I or the wrong length: what a misread camera sends.
INVALID_PLATES = ("苏EO1234", "苏E1I234", "苏E12", "沪A1234567", "XX12345")


@dataclass(frozen=True)
class SimLot:
    lot_code: str
    key_id: str
    private_pem: str
    district: str = ""


def dwell(rng: random.Random) -> timedelta:
    """Minutes to days: most stays are short, commuters stay a working day, a few park for days."""
    roll = rng.random()
    if roll < 0.55:
        minutes = rng.uniform(5, 180)  # shopping, errands
    elif roll < 0.85:
        minutes = rng.uniform(180, 11 * 60)  # a working day
    elif roll < 0.97:
        minutes = rng.uniform(11 * 60, 24 * 60)  # overnight
    else:
        minutes = rng.uniform(24 * 60, 6 * 24 * 60)  # days (the city takes replays up to 7)
    return timedelta(minutes=minutes)


def curve_at(at: datetime) -> float:
    return ARRIVAL_CURVE[at.astimezone(SHANGHAI).hour]


@dataclass
class SimStats:
    parkings: int = 0
    entries: int = 0
    exits: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    offline: int = 0
    queued: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    duplicates_sent: int = 0
    duplicates_confirmed: int = 0
    errors: int = 0
    exit_latency_ms: list[float] = field(default_factory=list)


class Simulator:
    """Realistic lot traffic through the connector SDK (each lot its own client and outbox).

    A parking is an entry (its time drawn so that entries follow `ARRIVAL_CURVE` and stays
    last minutes to days) and the exit now; parkings start at `rate` per second scaled by the
    curve at the current hour. A share of drivers is enrolled (the demo drivers), a share of
    plates is unreadable, and a share of entries is delivered a second time with the same
    `event_id`, as a flaky gate controller would.
    """

    def __init__(
        self,
        base_url: str,
        lots: list[SimLot],
        *,
        rate: float,
        outbox_dir: Path,
        enrolled_share: float = 0.5,
        invalid_share: float = 0.02,
        duplicate_share: float = 0.03,
        seed: int | None = None,
        exit_deadline: float = 0.8,
        day_curve: bool = True,
    ) -> None:
        if not lots:
            raise ValueError("no car parks to simulate")
        self.rate = rate
        self.day_curve = day_curve
        self.enrolled_share = enrolled_share
        self.invalid_share = invalid_share
        self.duplicate_share = duplicate_share
        self.rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.stats = SimStats()
        self._stats_lock = threading.Lock()
        outbox_dir.mkdir(parents=True, exist_ok=True)
        self.clients = [
            ConnectorClient(
                lot.key_id,
                lot.private_pem,
                base_url=base_url,
                outbox_path=outbox_dir / f"{lot.key_id}.sqlite3",
                exit_deadline=exit_deadline,
            )
            for lot in lots
        ]
        self._pool = ThreadPoolExecutor(max_workers=min(32, 2 * len(lots) + 2))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for client in self.clients:
            client.close()

    def pending(self) -> int:
        return sum(c.pending() for c in self.clients)

    def _plan(self, now: datetime) -> tuple[ConnectorClient, str, datetime, bool]:
        with self._rng_lock:
            rng = self.rng
            client = rng.choice(self.clients)
            roll = rng.random()
            if roll < self.invalid_share:
                plate = rng.choice(INVALID_PLATES)
            elif roll < self.invalid_share + self.enrolled_share:
                plate = demo_plate(rng.randrange(DEMO_DRIVERS))
            else:
                plate = f"苏{rng.choice(PROVINCE_LETTERS)}{rng.randrange(10_000, 100_000)}"
            # Rejection sampling: keep an entry time with the arrival curve's weight at it.
            while True:
                entered = now - dwell(rng)
                if rng.random() * max(ARRIVAL_CURVE) < curve_at(entered):
                    break
            duplicate = rng.random() < self.duplicate_share
        return client, plate, entered, duplicate

    def one_parking(self, now: datetime | None = None) -> None:
        at = now or utcnow()
        client, plate, entered, duplicate = self._plan(at)
        counted: dict[str, int] = {}
        try:
            entry = client.entry(
                plate=plate,
                plate_color="blue",
                vehicle_type="small",
                lane="E1",
                occurred_at=entered,
            )
            counted["entries"] = 1
            if duplicate and entry.status != "queued":
                try:
                    again = client.report_entry(
                        plate=plate,
                        plate_color="blue",
                        vehicle_type="small",
                        lane="E1",
                        occurred_at=entered,
                        event_id=entry.event_id,
                    )
                    counted["duplicates_sent"] = 1
                    counted["duplicates_confirmed"] = int(again.status == "duplicate")
                except ConnectorError as exc:
                    # The extra copy is sent by hand, outside the outbox: a busy city may
                    # turn it away (429), which is the city pushing back, not a failure.
                    if exc.http_status != 429:
                        raise
            started = time.perf_counter()
            decision = client.exit(plate=plate, plate_color="blue", lane="X1", occurred_at=at)
            latency = (time.perf_counter() - started) * 1000
        except EventRejected as exc:
            with self._stats_lock:
                self.stats.rejected[exc.code] += 1
                self.stats.parkings += 1
                self.stats.entries += counted.get("entries", 0)
            return
        except (ConnectorError, OSError) as exc:
            log.warning("simulate.failed", error=str(exc))
            with self._stats_lock:
                self.stats.errors += 1
            return
        with self._stats_lock:
            st = self.stats
            st.parkings += 1
            st.entries += 1
            st.exits += 1
            st.queued += int(entry.status == "queued")
            st.duplicates_sent += counted.get("duplicates_sent", 0)
            st.duplicates_confirmed += counted.get("duplicates_confirmed", 0)
            st.decisions[decision.decision] += 1
            st.offline += int(decision.offline)
            st.exit_latency_ms.append(latency)

    def current_rate(self, at: datetime) -> float:
        """Parkings per second now: `rate` shaped by the hour of day, or flat without
        `day_curve` (a test must not depend on when it runs)."""
        if not self.day_curve:
            return self.rate
        mean = sum(ARRIVAL_CURVE) / len(ARRIVAL_CURVE)
        return self.rate * curve_at(at) / mean

    def run(
        self,
        stop: threading.Event,
        duration_s: float | None = None,
        on_tick: Callable[[SimStats, float], None] | None = None,
    ) -> SimStats:
        """Start parkings as a Poisson process until `stop` or `duration_s`; wait for them."""
        began = time.monotonic()
        futures = []
        next_at = began
        last_tick = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if duration_s is not None and now - began >= duration_s:
                break
            if now >= next_at:
                futures.append(self._pool.submit(self.one_parking))
                with self._rng_lock:
                    gap = self.rng.expovariate(max(1e-6, self.current_rate(utcnow())))
                next_at += gap
                futures = [f for f in futures if not f.done()]
                if len(futures) > 1000:  # the city is slower than the traffic: let it catch up
                    wait(futures[:500])
            if on_tick is not None and now - last_tick >= 0.2:
                on_tick(self.stats, now - began)
                last_tick = now
            stop.wait(max(0.0, min(0.2, next_at - time.monotonic())))
        wait(futures)
        return self.stats


def sim_lots(manifest: list[dict[str, Any]], keys_dir: Path) -> list[SimLot]:
    return [
        SimLot(
            lot_code=entry["lot_code"],
            key_id=entry["key_id"],
            private_pem=(keys_dir / f"{entry['key_id']}.key").read_text(),
            district=entry.get("district") or _district_of(entry["lot_code"]),
        )
        for entry in manifest
    ]


def _district_of(lot_code: str) -> str:
    prefix = lot_code.split("-", 1)[0].lower()
    return next((d.code for d in SUZHOU_DISTRICTS if d.code[:3] == prefix), "")


def attach_demo(app: FastAPI, rt: Runtime, base_url: str) -> None:
    manifest = seed(rt)
    stop: threading.Event = app.state.shutdown.stop  # the traffic stops with the workers
    original = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[None]:
        async with original(application):
            # A gentle, steady flow: the demo should show parkings, not load-test a laptop.
            simulator = Simulator(
                base_url, sim_lots(manifest, KEYS_DIR), rate=0.4, outbox_dir=DEMO_OUTBOX, seed=11
            )
            thread = threading.Thread(
                target=simulator.run, args=(stop,), daemon=True, name="demo-traffic"
            )
            thread.start()
            log.info("demo.traffic_started", lots=len(manifest))
            yield
            stop.set()
            # Off the event loop: the simulator's last request goes to this very app.
            await anyio.to_thread.run_sync(lambda: thread.join(timeout=10))
            simulator.close()

    app.router.lifespan_context = lifespan


def simulate_cli(
    base_url: str,
    keys_dir: str,
    *,
    lots: int,
    rate: float,
    duration: float,
    district: str | None = None,
    enrolled_share: float = 0.5,
    invalid_share: float = 0.02,
    duplicate_share: float = 0.03,
    outbox_dir: str | None = None,
    console: Console | None = None,
) -> SimStats:
    """`citypark simulate`: traffic for `duration` seconds with a live line, then a summary."""
    out = console or Console()
    path = Path(keys_dir)
    manifest_path = path / "lots.json"
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{manifest_path} not found: start the city with `make run` (it seeds demo car parks)"
        )
    chosen = [
        lot
        for lot in sim_lots(json.loads(manifest_path.read_text()), path)
        if district is None or lot.district == district
    ][:lots]
    if not chosen:
        raise ValueError(f"no demo car park in district {district!r}")
    simulator = Simulator(
        base_url,
        chosen,
        rate=rate,
        outbox_dir=Path(outbox_dir) if outbox_dir else path / "outbox",
        enrolled_share=enrolled_share,
        invalid_share=invalid_share,
        duplicate_share=duplicate_share,
    )
    stop = threading.Event()

    def line(st: SimStats, elapsed: float) -> Text:
        return Text(
            f"{elapsed:5.0f}s  parkings {st.parkings}  entries {st.entries}  exits {st.exits}  "
            f"postpay {st.decisions['postpay']}  pay_on_site {st.decisions['pay_on_site']}  "
            f"offline {st.offline}  rejected {sum(st.rejected.values())}  "
            f"duplicates {st.duplicates_sent}  queued {st.queued}  "
            f"({st.parkings / max(elapsed, 1e-9):.1f}/s)"
        )

    began = time.monotonic()
    try:
        with Live(line(simulator.stats, 0), console=out, refresh_per_second=5) as live:
            stats = simulator.run(stop, duration, on_tick=lambda st, el: live.update(line(st, el)))
            live.update(line(stats, time.monotonic() - began))
        left = sum(c.flush(timeout=30) for c in simulator.clients)
    except KeyboardInterrupt:
        stop.set()
        stats, left = simulator.stats, simulator.pending()
    finally:
        simulator.close()
    out.print(summary(stats, time.monotonic() - began, len(chosen), left))
    return stats


def summary(st: SimStats, elapsed: float, lots: int, pending: int) -> Table:
    latencies = sorted(st.exit_latency_ms)

    def pct(p: float) -> str:
        return f"{latencies[int(p * (len(latencies) - 1))]:.1f} ms" if latencies else "-"

    table = Table(title="simulation summary", show_header=False)
    rows = [
        ("car parks", str(lots)),
        ("duration", f"{elapsed:.1f} s"),
        ("parkings", f"{st.parkings} ({st.parkings / max(elapsed, 1e-9):.1f}/s)"),
        ("entries / exits", f"{st.entries} / {st.exits}"),
        ("decisions", ", ".join(f"{k} {v}" for k, v in sorted(st.decisions.items())) or "-"),
        ("decided offline", str(st.offline)),
        (
            "rejected (kept in the outbox)",
            ", ".join(f"{k} {v}" for k, v in st.rejected.items()) or "0",
        ),
        (
            "duplicates sent / answered duplicate",
            f"{st.duplicates_sent} / {st.duplicates_confirmed}",
        ),
        ("entries queued (city away)", str(st.queued)),
        ("errors", str(st.errors)),
        ("exit decision p50 / p95 / max", f"{pct(0.5)} / {pct(0.95)} / {pct(1.0)}"),
        ("still pending in outboxes", str(pending)),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table
