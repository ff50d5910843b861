"""Money under faults, on PostgreSQL and on the embedded default (SQLite) alike: a provider
that answers late while its notification captures the charge, a charge whose processing keeps
failing, charge workers racing each other. Billing and the payment sandbox are served over real
HTTP from this process, so the sandbox's notifications really race the worker's answer."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from services import city
from services.billing.charge import service as charges
from services.billing.charge.models import Charge, ChargeStatus
from services.billing.driver.models import Driver, PaymentAccount
from services.billing.ledger import service as ledger
from services.billing.ledger.models import Journal
from services.billing.main import sandbox_notify_secret
from services.billing.provider.port import PaymentProvider
from services.billing.provider.sandbox import SandboxProvider
from services.billing.refund import service as refunds
from services.billing.refund.models import Refund, RefundStatus
from shared.events import Decision, SessionClosed
from shared.runtime import Runtime
from shared.settings import BusKind, CacheKind, Settings
from tests.conftest import scratch_database

pytestmark = pytest.mark.integration


class FixedPrice:
    def __init__(self, fee_fen: int) -> None:
        self.fee_fen = fee_fen

    def call(self, method: str, path: str, json: Any = None) -> Any:
        return {"fee_fen": self.fee_fen, "breakdown": [], "operator_id": "op"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Money:
    """Billing and the sandbox on one backend, served over HTTP, with helpers."""

    def __init__(self, settings: Settings, url: str) -> None:
        self.settings = settings
        self.url = url
        self.rt = Runtime(settings, source="billing")
        self.factory: sessionmaker[Session] = self.rt.sessionmaker
        self.provider = SandboxProvider(
            f"{url}/sandbox/pay",
            timeout=1.0,
            notify_url=f"{url}/v1/providers/sandbox/notifications",
            notify_secret=sandbox_notify_secret(settings),
        )
        self.providers: dict[str, PaymentProvider] = {"sandbox": self.provider}

    def driver(self, behaviour: str, balance_fen: int = 100_000) -> tuple[str, str]:
        agreement = httpx.post(
            f"{self.url}/sandbox/pay/v1/agreements",
            json={"holder": "t", "balance_fen": balance_fen, "behaviour": behaviour},
        ).json()["agreement_no"]
        with self.factory() as db, db.begin():
            driver = Driver(phone=f"139{uuid.uuid4().int % 10**8:08d}")
            db.add(driver)
            db.flush()
            db.add(
                PaymentAccount(
                    driver_id=driver.id,
                    provider="sandbox",
                    agreement_no=agreement,
                    masked_account="****",
                )
            )
            return driver.id, agreement

    def open(self, driver_id: str, fee: int) -> str:
        now = datetime.now(UTC)
        event = SessionClosed(
            session_id=str(uuid.uuid4()),
            lot_id="lot",
            lot_code="L",
            district="gusu",
            operator_id="op-faults",
            plate="苏E12345",
            plate_color="blue",
            vehicle_type="small",
            entered_at=now - timedelta(hours=1),
            exited_at=now,
            decision=Decision.postpay,
            driver_id=driver_id,
        )
        with self.factory() as db, db.begin():
            charge = charges.open_charge(db, FixedPrice(fee), event)  # type: ignore[arg-type]
            assert charge is not None
            return charge.id

    def balance(self, agreement: str) -> int:
        answer = httpx.get(f"{self.url}/sandbox/pay/v1/agreements/{agreement}").json()
        return int(answer["balance_fen"])

    def charge(self, charge_id: str) -> Charge:
        with self.factory() as db:
            found = db.get(Charge, charge_id)
            assert found is not None
            return found

    def journals(self, charge_id: str) -> int:
        with self.factory() as db:
            return int(
                db.scalar(
                    select(func.count())
                    .select_from(Journal)
                    .where(Journal.kind == "charge_captured", Journal.ref_id == charge_id)
                )
                or 0
            )

    def work_until(
        self, done: Any, workers: int = 2, timeout_s: float = 60, linger_s: float = 4.0
    ) -> None:
        """Run charge workers (like billing does) until `done()`, then `linger_s` longer (a
        late answer still in flight must not undo it), failing at the deadline."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                if not charges.process_due(self.factory, self.settings, self.providers):
                    stop.wait(0.1)

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout_s
        try:
            while not done():
                assert time.monotonic() < deadline, "the charges did not settle in time"
                time.sleep(0.2)
            time.sleep(linger_s)
            assert done(), "settled, then undone by a late answer"
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=15)


@pytest.fixture(params=["postgresql", "sqlite"])
def money(request: pytest.FixtureRequest, tmp_path: Path, infra: Any) -> Iterator[Money]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"

    def serve(database_url: str) -> Iterator[Money]:
        settings = Settings(
            database_url=database_url,
            bus=BusKind.log,
            cache=CacheKind.memory,
            jwt_secret=SecretStr("faults-secret-of-at-least-32-bytes!"),
            paysandbox_url=f"{url}/sandbox/pay",
            billing_url=url,
            sandbox_mode=True,
        )
        city.migrate(settings)
        money = Money(settings, url)
        sandbox = Runtime(settings, source="paysandbox")
        app = city.build_app(
            money.rt,
            [city.PARTS["billing"]],
            # The sandbox's own sender, as in the city: its notifications race the answers.
            workers=city.PARTS["paysandbox"].workers(sandbox),
            mount_sandbox=sandbox,
        )
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        try:
            yield money
        finally:
            server.should_exit = True
            thread.join(timeout=10)

    if request.param == "sqlite":
        yield from serve(f"sqlite:///{tmp_path / 'money.db'}")
    else:
        with scratch_database(infra) as database_url:
            yield from serve(database_url)


def test_a_late_answer_never_overwrites_the_capture_its_notification_booked(money: Money) -> None:
    """`timeout_then_ok`: the sandbox captures, notifies at once and answers only after the
    worker gave up waiting. Whichever lands first, the charge ends captured with one capture
    journal and the money taken once, and the charges behind it are not held up."""
    slow_driver, slow_agreement = money.driver("timeout_then_ok", 10_000)
    ok_driver, ok_agreement = money.driver("ok", 10_000)
    slow = money.open(slow_driver, 700)
    others = [money.open(ok_driver, 100) for _ in range(5)]

    def settled() -> bool:
        return (
            all(money.charge(c).status == ChargeStatus.captured for c in [slow, *others])
            and money.journals(slow) == 1
        )

    money.work_until(settled)
    assert money.journals(slow) == 1
    assert money.balance(slow_agreement) == 10_000 - 700
    assert money.balance(ok_agreement) == 10_000 - 5 * 100
    with money.factory() as db:
        assert ledger.check(db)[0]  # every journal balances, the ledger sums to zero


class Exploding:
    """A provider that fails with a bug (not an outage) for one agreement."""

    def __init__(self, inner: PaymentProvider, agreement: str) -> None:
        self.inner = inner
        self.agreement = agreement
        self.calls = 0

    def charge(self, **kwargs: Any) -> Any:
        if kwargs["agreement_no"] == self.agreement:
            self.calls += 1
            raise KeyError("amount")  # a bug somewhere on the path
        return self.inner.charge(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_charge_that_keeps_failing_is_parked_and_never_blocks_the_others(
    money: Money,
) -> None:
    bad_driver, bad_agreement = money.driver("ok", 10_000)
    ok_driver, _ = money.driver("ok", 10_000)
    bad = money.open(bad_driver, 300)  # first in the queue
    time.sleep(0.01)
    others = [money.open(ok_driver, 100) for _ in range(4)]
    exploding = Exploding(money.provider, bad_agreement)
    money.providers["sandbox"] = exploding  # type: ignore[assignment]
    # Retries of an unexpected error back off by seconds; make them due at once here.

    def settled() -> bool:
        with money.factory() as db, db.begin():
            db.execute(
                Charge.__table__.update()
                .where(Charge.id == bad, Charge.status.in_(["pending", "unknown"]))
                .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=1))
            )
        return money.charge(bad).status == ChargeStatus.parked and all(
            money.charge(c).status == ChargeStatus.captured for c in others
        )

    money.work_until(settled, timeout_s=60)
    assert exploding.calls == charges.workqueue.PARK_AFTER
    assert money.charge(bad).failure_code == "parked:KeyError"
    assert money.balance(bad_agreement) == 10_000  # nothing was taken
    with money.factory() as db:
        assert [c.id for c in charges.parked(db)] == [bad]

    # Ops fix the cause and replay: asked about first, then sent, captured once.
    money.providers["sandbox"] = money.provider
    with money.factory() as db, db.begin():
        charges.replay_parked(db, bad)
    money.work_until(lambda: money.charge(bad).status == ChargeStatus.captured)
    assert money.balance(bad_agreement) == 10_000 - 300
    assert money.journals(bad) == 1


def test_racing_workers_and_duplicate_notifications_take_each_charge_once(money: Money) -> None:
    """Four workers over a queue of charges from `ok`, `duplicate_notify`, `flaky` and
    `timeout_then_ok` agreements: every charge captured once, every journal once."""
    agreements: list[str] = []
    ids: list[str] = []
    for behaviour in ("ok", "duplicate_notify", "flaky", "timeout_then_ok"):
        driver, agreement = money.driver(behaviour, 100_000)
        agreements.append(agreement)
        ids += [money.open(driver, 100) for _ in range(4 if behaviour != "timeout_then_ok" else 1)]

    def settled() -> bool:
        with money.factory() as db, db.begin():
            # Backoff after a flaky refusal or a timeout is seconds: make retries due now.
            db.execute(
                Charge.__table__.update()
                .where(Charge.id.in_(ids), Charge.status.in_(["pending", "unknown"]))
                .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=1))
            )
        return all(money.charge(c).status == ChargeStatus.captured for c in ids)

    money.work_until(settled, workers=4, timeout_s=90)
    assert [money.journals(c) for c in ids] == [1] * len(ids)
    assert sum(100_000 - money.balance(a) for a in agreements) == 100 * len(ids)


def test_racing_refund_workers_and_notices_refund_each_once(money: Money) -> None:
    """Refunds of captured charges, sent by four workers at once while the sandbox's refund
    notices race their answers: each refund succeeds once, with one journal, money back once."""
    driver, agreement = money.driver("ok", 100_000)
    ids = [money.open(driver, 500) for _ in range(6)]
    money.work_until(lambda: all(money.charge(c).status == ChargeStatus.captured for c in ids))
    refund_ids: list[str] = []
    for charge_id in ids:
        with money.factory() as db, db.begin():
            dispute = refunds.open_dispute(db, driver, charge_id, "barrier was open")
            decided = refunds.decide(db, dispute.id, "ops", "refund", 200)
            assert decided.refund_id is not None
            refund_ids.append(decided.refund_id)

    def refunded() -> bool:
        with money.factory() as db:
            found = db.scalars(select(Refund).where(Refund.id.in_(refund_ids))).all()
            return all(r.status == RefundStatus.succeeded for r in found)

    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if not refunds.process_due(money.factory, money.providers):
                stop.wait(0.1)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while not refunded():
            assert time.monotonic() < deadline, "the refunds did not settle in time"
            time.sleep(0.2)
        time.sleep(3)  # late answers and notices still in flight change nothing
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
    with money.factory() as db:
        journals = db.scalars(
            select(Journal.ref_id).where(Journal.kind == "refund", Journal.ref_id.in_(refund_ids))
        ).all()
        assert ledger.check(db)[0]
    assert sorted(journals) == sorted(refund_ids)
    assert money.balance(agreement) == 100_000 - 6 * 500 + 6 * 200
