"""The chaos run's traffic: a seeded city (car parks through the admin API, drivers with mixed
payment-sandbox behaviours) and parkings sent through the connector SDK at a steady rate, with
duplicated and reordered deliveries, the way flaky gate controllers send them."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from citypark_connector import ConnectorClient, ConnectorError, EventRejected, generate_keypair
from rich.progress import Progress, TaskID
from sqlalchemy.orm import Session, sessionmaker

from loadtests.ownership import proven_vehicle
from loadtests.seed import plate
from services.billing.driver import service as drivers
from services.billing.driver.models import Driver, PaymentAccount
from services.demo import dwell
from services.lots.schemas import EXAMPLE_TARIFF
from services.paysandbox.models import Agreement
from shared.db import transaction
from shared.settings import Settings
from shared.topics import SUZHOU_DISTRICTS

# Payment-sandbox behaviours of enrolled drivers (services/paysandbox/endpoints.py), by weight.
BEHAVIOURS: dict[str, float] = {
    "ok": 0.40,
    "timeout_then_ok": 0.10,
    "duplicate_notify": 0.15,
    "flaky": 0.15,
    "slow": 0.10,
    "insufficient_funds": 0.10,
}
# How each parking is delivered. A second controller of the same car park (its own SDK outbox,
# the same key) re-sends an event with the same id: a duplicate delivery.
VARIANTS: dict[str, float] = {
    "dup_entry": 0.05,  # the entry delivered twice
    "dup_exit": 0.05,  # the exit delivered twice
    "exit_first": 0.025,  # the exit delivered before its entry
    "late_dup_entry": 0.025,  # the entry delivered again after the exit (the session closed)
}


@dataclass(frozen=True)
class Lot:
    lot_id: str
    code: str
    district: str
    key_id: str


@dataclass(frozen=True)
class Parking:
    index: int
    lot: int
    plate: str
    driver_behaviour: str | None  # None: a vehicle nobody enrolled
    variant: str
    dwell_s: float
    entry_id: str
    exit_id: str


@dataclass
class Outcome:
    """What the gate side saw of one parking."""

    entry_status: str | None = None
    decision: str | None = None
    offline: bool = False
    # The re-delivering controller's own answer to a duplicated exit: offline, the two gates
    # may disagree (one without a snapshot yet), and the first to reach the city stands.
    second_decision: str | None = None
    second_offline: bool = False
    rejected: str | None = None
    error: str | None = None


@dataclass
class Seeded:
    lots: list[Lot]
    private_pem: str
    enrolled: dict[str, str]  # plate -> behaviour
    drivers_by_behaviour: Counter[str] = field(default_factory=Counter)


def _weighted(rng: random.Random, weights: dict[str, float], rest: str | None) -> str | None:
    roll = rng.random()
    for name, w in weights.items():
        if roll < w:
            return name
        roll -= w
    return rest


def seed_city(
    admin: httpx.Client,
    factory: sessionmaker[Session],
    settings: Settings,
    *,
    lots_per_district: int,
    n_drivers: int,
    rng: random.Random,
) -> Seeded:
    """Operators and car parks through the admin API (the contract); drivers with their
    agreements straight into billing's and the sandbox's tables (sign-in is not under test),
    each announced to the gate by its account snapshot, as billing does."""
    private_pem, public_pem = generate_keypair()  # one key for all: distinct key ids are enough
    operators = []
    for i in range(3):
        answer = admin.post(
            "/v1/admin/operators",
            json={"name": f"chaos operator {i}", "commission_bps": 500 + 50 * i,
                  "settlement_account": f"chaos-{i}"},
        )  # fmt: skip
        answer.raise_for_status()
        operators.append(answer.json()["id"])
    lots: list[Lot] = []
    for d in SUZHOU_DISTRICTS:
        for i in range(lots_per_district):
            n = len(lots)
            key_id = f"chaos-{d.code}-{i}"
            answer = admin.post(
                "/v1/admin/lots",
                json={
                    "code": f"CH-{d.code[:3].upper()}-{i}",
                    "name": f"chaos {d.name} {i}",
                    "district": d.code,
                    "operator_id": operators[n % len(operators)],
                    "capacity": 100_000,  # never full: a full lot is not what is under test
                    "location": {"lat": 31.3 + rng.uniform(-0.2, 0.2),
                                 "lng": 120.6 + rng.uniform(-0.3, 0.3)},
                    "postpay_enabled": True,
                    "public_keys": [{"key_id": key_id, "public_key_pem": public_pem}],
                    "tariff": EXAMPLE_TARIFF,
                },
            )  # fmt: skip
            answer.raise_for_status()
            lots.append(Lot(answer.json()["id"], answer.json()["code"], d.code, key_id))
    seeded = Seeded(lots, private_pem, {})
    for start in range(0, n_drivers, 250):
        with transaction(factory) as db:
            for n in range(start, min(start + 250, n_drivers)):
                behaviour = _weighted(rng, BEHAVIOURS, "ok") or "ok"
                p = plate(n, city="E")
                driver = Driver(phone=f"1370{n:07d}")
                agreement = Agreement(
                    agreement_no=f"AGR-CHAOS-{n:05d}",
                    holder=f"chaos driver {n}",
                    balance_fen=0 if behaviour == "insufficient_funds" else 10**9,
                    behaviour=behaviour,
                )
                db.add_all([driver, agreement])
                db.flush()
                db.add(proven_vehicle(driver.id, p))
                db.add(
                    PaymentAccount(
                        driver_id=driver.id,
                        provider="sandbox",
                        agreement_no=agreement.agreement_no,
                        masked_account=f"sandbox ****{n:04d}",
                    )
                )
                db.flush()
                drivers.publish_account_state(db, settings, driver)
                seeded.enrolled[p] = behaviour
                seeded.drivers_by_behaviour[behaviour] += 1
    return seeded


def plan_parkings(
    seeded: Seeded, sessions: int, enrolled_share: float, rng: random.Random
) -> list[Parking]:
    """The same seed gives the same parkings. A vehicle parks at most once per car park, so
    every entry pairs with its own exit and nothing else (no overlapping stays)."""
    enrolled = sorted(seeded.enrolled)
    free_pairs = [(lot, p) for lot in range(len(seeded.lots)) for p in enrolled]
    rng.shuffle(free_pairs)
    out = []
    for i in range(sessions):
        if free_pairs and rng.random() < enrolled_share:
            lot, p = free_pairs.pop()
            behaviour: str | None = seeded.enrolled[p]
        else:
            lot, p, behaviour = rng.randrange(len(seeded.lots)), plate(500_000 + i, "A"), None
        out.append(
            Parking(
                index=i,
                lot=lot,
                plate=p,
                driver_behaviour=behaviour,
                variant=_weighted(rng, VARIANTS, "normal") or "normal",
                dwell_s=dwell(rng).total_seconds(),
                entry_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                exit_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            )
        )
    return out


class Traffic:
    """Sends the planned parkings at `rate` per second through each car park's SDK client
    (durable outbox under `outbox_dir`); a second client per car park sends the re-deliveries."""

    def __init__(
        self, gateway: str, seeded: Seeded, parkings: list[Parking], rate: float, outbox_dir: Path
    ) -> None:
        self.parkings = parkings
        self.rate = rate
        self.outcomes = [Outcome() for _ in parkings]
        self.sent = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        outbox_dir.mkdir(parents=True, exist_ok=True)

        def client(lot: Lot, role: str) -> ConnectorClient:
            return ConnectorClient(
                lot.key_id,
                seeded.private_pem,
                base_url=gateway,
                outbox_path=outbox_dir / f"{lot.key_id}-{role}.sqlite3",
                backoff_cap_s=5.0,  # the city comes back within seconds in this drill
                eligibility_refresh_s=30.0,
            )

        self.main = [client(lot, "main") for lot in seeded.lots]
        self.second = [client(lot, "second") for lot in seeded.lots]
        self._pool = ThreadPoolExecutor(max_workers=24, thread_name_prefix="chaos-parking")

    @property
    def clients(self) -> list[ConnectorClient]:
        return self.main + self.second

    def one(self, p: Parking) -> None:
        out = self.outcomes[p.index]
        main, second = self.main[p.lot], self.second[p.lot]
        now = datetime.now(UTC)
        entered, exited = now - timedelta(seconds=p.dwell_s), now - timedelta(seconds=1)

        def entry(client: ConnectorClient) -> str:
            return str(
                client.entry(
                    plate=p.plate,
                    plate_color="blue",
                    vehicle_type="small",
                    lane="E1",
                    occurred_at=entered,
                    event_id=p.entry_id,
                ).status
            )

        def exit_(client: ConnectorClient) -> Any:
            return client.exit(
                plate=p.plate, plate_color="blue", lane="X1", occurred_at=exited, event_id=p.exit_id
            )

        try:
            if p.variant == "exit_first":
                decision = exit_(main)
                out.entry_status = entry(main)
            else:
                out.entry_status = entry(main)
                if p.variant == "dup_entry":
                    entry(second)
                decision = exit_(main)
                if p.variant == "dup_exit":
                    again = exit_(second)
                    out.second_decision = str(again.decision)
                    out.second_offline = bool(again.offline)
                elif p.variant == "late_dup_entry":
                    entry(second)
            out.decision, out.offline = str(decision.decision), bool(decision.offline)
        except EventRejected as exc:
            out.rejected = exc.code
        except (ConnectorError, OSError) as exc:
            out.error = repr(exc)
        with self._lock:
            self.sent += 1

    def run(self, stop: threading.Event, progress: Progress, task: TaskID) -> None:
        """Start parkings at a steady rate until all are sent or `stop`; waits for them."""
        try:
            t0 = time.monotonic()
            futures = []
            for p in self.parkings:
                delay = t0 + p.index / self.rate - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
                future = self._pool.submit(self.one, p)
                future.add_done_callback(lambda _: progress.advance(task))
                futures.append(future)
            for f in futures:
                f.result()
        except BaseException as exc:  # handed to the main thread, which reports it
            self.error = exc

    def pending(self) -> int:
        return sum(c.pending() for c in self.clients)

    def flush(self, timeout_s: float) -> int:
        """Wait (bounded) until every outbox has been delivered; events still pending."""
        deadline = time.monotonic() + timeout_s
        left = self.pending()
        while left and time.monotonic() < deadline:
            with ThreadPoolExecutor(8) as pool:
                left = sum(pool.map(lambda c: c.flush(timeout=5), self.clients))
        return self.pending()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for c in self.clients:
            try:
                c.close()
            except Exception:  # closing is best effort on the way out
                pass

    def figures(self) -> dict[str, object]:
        outcomes = self.outcomes[: len(self.parkings)]
        return {
            "parkings_planned": len(self.parkings),
            "parkings_sent": self.sent,
            "enrolled": sum(p.driver_behaviour is not None for p in self.parkings),
            "not_enrolled": sum(p.driver_behaviour is None for p in self.parkings),
            "by_behaviour": dict(
                Counter(p.driver_behaviour or "not_enrolled" for p in self.parkings)
            ),
            "by_delivery": dict(Counter(p.variant for p in self.parkings)),
            "entries": dict(Counter(o.entry_status or "none" for o in outcomes)),
            "gate_decisions": dict(Counter(o.decision or "none" for o in outcomes)),
            "decided_offline": sum(o.offline for o in outcomes),
            "rejected": dict(Counter(o.rejected for o in outcomes if o.rejected)),
            "errors": sum(o.error is not None for o in outcomes),
            "first_errors": [o.error for o in outcomes if o.error][:5],
        }
