"""Demo city for `make run`: operators, car parks in every district, enrolled drivers, and
simulated gate traffic through the connector SDK, so parkings and charges appear at once."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from citypark_connector import ConnectorClient, ConnectorError, generate_keypair
from fastapi import FastAPI
from rich.progress import Progress
from sqlalchemy import select

from services.billing.driver import service as drivers
from services.billing.driver.models import Driver, PaymentAccount, Vehicle
from services.lots import service as lots
from services.lots.models import Lot
from services.lots.schemas import EXAMPLE_TARIFF, Location, LotCreate, OperatorCreate, PublicKeyIn
from services.paysandbox.models import Agreement
from shared.db import transaction
from shared.runtime import Runtime
from shared.timeutil import utcnow
from shared.topics import SUZHOU_DISTRICTS

log = structlog.get_logger(__name__)

KEYS_DIR = Path(".local/demo-keys")
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
                    )
                    (keys_dir / f"{key_id}.key").write_text(private_pem)
                    known.append(
                        {
                            "lot_id": lot.id,
                            "lot_code": code,
                            "key_id": key_id,
                            "capacity": lot.capacity,
                        }
                    )
        for n in range(DEMO_DRIVERS):
            phone = f"139000{n:05d}"
            if db.scalar(select(Driver.id).where(Driver.phone == phone)):
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
            db.add(Vehicle(driver_id=driver.id, plate=demo_plate(n), plate_color="blue"))
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


class Traffic:
    """Parkings through the SDK: an entry some minutes ago, then the exit now."""

    def __init__(
        self, base_url: str, lots_manifest: list[dict[str, Any]], keys_dir: Path, seed_: int = 11
    ) -> None:
        self.rng = random.Random(seed_)
        self.clients = [
            ConnectorClient(
                entry["key_id"],
                (keys_dir / f"{entry['key_id']}.key").read_text(),
                base_url=base_url,
                timeout=10.0,
            )
            for entry in lots_manifest
        ]

    def one_parking(self) -> str:
        client = self.rng.choice(self.clients)
        enrolled = self.rng.random() < 0.6
        plate = demo_plate(
            self.rng.randrange(DEMO_DRIVERS) if enrolled else 100 + self.rng.randrange(9000)
        )
        stay = timedelta(minutes=self.rng.randint(5, 300))
        now = utcnow()
        client.report_entry(
            plate=plate, plate_color="blue", vehicle_type="small", lane="E1", occurred_at=now - stay
        )
        exit_ = client.report_exit(plate=plate, plate_color="blue", lane="X1", occurred_at=now)
        return str(exit_.decision)

    def run(self, stop: threading.Event, every_s: float = 2.0) -> None:
        while not stop.wait(self.rng.uniform(0.5, every_s)):
            try:
                self.one_parking()
            except (ConnectorError, OSError) as exc:
                log.warning("demo.traffic_failed", error=str(exc))


def attach_demo(app: FastAPI, rt: Runtime, base_url: str) -> None:
    manifest = seed(rt)
    stop = threading.Event()
    original = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[None]:
        async with original(application):
            thread = threading.Thread(
                target=Traffic(base_url, manifest, KEYS_DIR).run,
                args=(stop,),
                daemon=True,
                name="demo-traffic",
            )
            thread.start()
            log.info("demo.traffic_started", lots=len(manifest))
            yield
            stop.set()

    app.router.lifespan_context = lifespan


def simulate_cli(base_url: str, keys_dir: str, parkings: int, rate: float) -> None:
    path = Path(keys_dir)
    manifest = json.loads((path / "lots.json").read_text())
    traffic = Traffic(base_url, manifest, path, seed_=int(time.time()))
    decisions: dict[str, int] = {}
    with Progress() as progress:
        task = progress.add_task("parkings", total=parkings)
        for _ in range(parkings):
            decision = traffic.one_parking()
            decisions[decision] = decisions.get(decision, 0) + 1
            progress.advance(task)
            time.sleep(1 / rate)
    log.info("simulate.done", parkings=parkings, **decisions)
