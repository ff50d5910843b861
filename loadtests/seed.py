"""Seed a city for load: operators, car parks (with connector keys) across the ten districts and
enrolled drivers with sandbox agreements. Writes a manifest the load users read."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from citypark_connector import generate_keypair
from rich.progress import Progress

from loadtests.ownership import proven_vehicle
from services.billing.driver import service as drivers
from services.billing.driver.models import Driver, PaymentAccount
from services.lots.schemas import EXAMPLE_TARIFF
from services.paysandbox.models import Agreement
from shared.db import transaction
from shared.runtime import Runtime
from shared.topics import SUZHOU_DISTRICTS

LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


@dataclass
class LotKey:
    lot_id: str
    lot_code: str
    district: str
    key_id: str
    private_pem: str


@dataclass
class Manifest:
    lots: list[LotKey]
    enrolled_plates: list[str]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {"lots": [asdict(k) for k in self.lots], "enrolled_plates": self.enrolled_plates}
            )
        )

    @classmethod
    def load(cls, path: Path) -> Manifest:
        raw = json.loads(path.read_text())
        return cls([LotKey(**k) for k in raw["lots"]], raw["enrolled_plates"])


def plate(n: int, city: str = "E") -> str:
    """Distinct valid plates: 苏<city><letter><4 digits>."""
    return f"苏{city}{LETTERS[(n // 10_000) % len(LETTERS)]}{n % 10_000:04d}"


def seed(rt: Runtime, admin: httpx.Client, *, n_lots: int, n_drivers: int, run_id: str) -> Manifest:
    """Operators and car parks through the admin API (the contract); drivers straight into
    billing's tables, since sign-in by SMS code is not what is being measured."""
    rng = random.Random(run_id)
    manifest = Manifest([], [])
    # One key pair for all load lots keeps seeding fast; key ids (and so lots) stay distinct.
    private_pem, public_pem = generate_keypair()
    ops = []
    for i in range(5):
        answer = admin.post(
            "/v1/admin/operators",
            json={
                "name": f"load operator {i}",
                "commission_bps": 500,
                "settlement_account": f"acct-{i}",
            },
        )
        answer.raise_for_status()
        ops.append(answer.json()["id"])

    def create_lot(i: int) -> LotKey:
        district = SUZHOU_DISTRICTS[i % len(SUZHOU_DISTRICTS)].code
        key_id = f"load-{run_id}-{i}"
        answer = admin.post(
            "/v1/admin/lots",
            json={
                "code": f"LD-{run_id}-{i}",
                "name": f"load lot {i}",
                "district": district,
                "operator_id": ops[i % len(ops)],
                "capacity": rng.randint(50, 800),
                "location": {
                    "lat": 31.3 + rng.uniform(-0.2, 0.2),
                    "lng": 120.6 + rng.uniform(-0.3, 0.3),
                },
                "postpay_enabled": True,
                "public_keys": [{"key_id": key_id, "public_key_pem": public_pem}],
                "tariff": EXAMPLE_TARIFF,
            },
        )
        answer.raise_for_status()
        return LotKey(answer.json()["id"], answer.json()["code"], district, key_id, private_pem)

    with Progress(transient=True) as progress:
        task = progress.add_task("seeding car parks (admin API)", total=n_lots)
        with ThreadPoolExecutor(4) as pool:
            for key in pool.map(create_lot, range(n_lots)):
                manifest.lots.append(key)
                progress.advance(task)
        task = progress.add_task("seeding drivers", total=n_drivers)
        offset = rng.randrange(200_000)
        for start in range(0, n_drivers, 500):
            with transaction(rt.sessionmaker) as db:
                for n in range(start, min(start + 500, n_drivers)):
                    p = plate(offset + n)
                    driver = Driver(phone=f"15{rng.randrange(10**9):09d}")
                    agreement = Agreement(
                        agreement_no=f"AGR-{run_id}-{n}",
                        holder="load",
                        balance_fen=10**9,
                        behaviour="ok",
                    )
                    db.add_all([driver, agreement])
                    db.flush()
                    db.add(proven_vehicle(driver.id, p))
                    db.add(
                        PaymentAccount(
                            driver_id=driver.id,
                            provider="sandbox",
                            agreement_no=agreement.agreement_no,
                            masked_account="****",
                        )
                    )
                    db.flush()
                    drivers.publish_account_state(db, rt.settings, driver)
                    manifest.enrolled_plates.append(p)
            progress.advance(task, min(500, n_drivers - start))
    return manifest
