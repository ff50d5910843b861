"""The charge state machine against the payment sandbox over real HTTP, on PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.billing.charge import service as charges
from services.billing.charge.models import Charge, ChargeStatus
from services.billing.driver.models import Driver, PaymentAccount
from services.billing.ledger import service as ledger
from services.billing.ledger.models import Journal
from services.billing.provider.sandbox import SandboxProvider
from shared.bus.models import LogRow
from shared.events import AccountUpdated, CloudEvent, Decision, SessionClosed
from shared.settings import Settings
from shared.topics import ACCOUNT_EVENTS

pytestmark = pytest.mark.integration


class FixedPrice:
    """The lots service's price answer, fixed: this test is about billing, not tariffs."""

    def __init__(self, fee_fen: int) -> None:
        self.fee_fen = fee_fen

    def call(self, method: str, path: str, json: Any = None) -> Any:
        return {"fee_fen": self.fee_fen, "breakdown": [], "operator_id": "op"}


def enrolled_driver(
    factory: sessionmaker[Session], sandbox_url: str, behaviour: str, balance_fen: int = 100_000
) -> tuple[str, str]:
    agreement = httpx.post(
        f"{sandbox_url}/v1/agreements",
        json={"holder": "t", "balance_fen": balance_fen, "behaviour": behaviour},
    ).json()["agreement_no"]
    with factory() as db, db.begin():
        driver = Driver(phone=f"138{uuid.uuid4().int % 10**8:08d}")
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


def closed(driver_id: str) -> SessionClosed:
    now = datetime.now(UTC)
    return SessionClosed(
        session_id=str(uuid.uuid4()),
        lot_id="lot",
        lot_code="L",
        district="gusu",
        operator_id=f"op-{uuid.uuid4().hex[:6]}",
        plate="苏E12345",
        plate_color="blue",
        vehicle_type="small",
        entered_at=now - timedelta(hours=2),
        exited_at=now,
        decision=Decision.postpay,
        driver_id=driver_id,
    )


def open_and_run(
    factory: sessionmaker[Session],
    settings: Settings,
    provider: SandboxProvider,
    event: SessionClosed,
    fee: int,
    rounds: int = 1,
) -> Charge:
    for _ in range(2):  # the closing event delivered twice
        with factory() as db, db.begin():
            charges.open_charge(db, FixedPrice(fee), event)  # type: ignore[arg-type]
    for _ in range(rounds):
        with factory() as db, db.begin():
            charge = db.scalar(select(Charge).where(Charge.session_id == event.session_id))
            assert charge is not None
            if charge.status in (ChargeStatus.pending, ChargeStatus.unknown):
                charges.advance(db, settings, {"sandbox": provider}, charge)
    with factory() as db:
        found = db.scalars(select(Charge).where(Charge.session_id == event.session_id)).all()
    assert len(found) == 1  # one closed session → exactly one charge
    return found[0]


def test_capture_posts_a_balanced_journal(
    factory: sessionmaker[Session], settings: Settings, sandbox_url: str
) -> None:
    driver, _ = enrolled_driver(factory, sandbox_url, "ok")
    event = closed(driver)
    charge = open_and_run(factory, settings, SandboxProvider(sandbox_url), event, 950)
    assert (charge.status, charge.amount_fen) == (ChargeStatus.captured, 950)
    with factory() as db:
        assert ledger.balance(db, ledger.operator_payable(event.operator_id)) == -950
        balanced, total, _, unbalanced = ledger.check(db)
    assert balanced
    assert total == 0
    assert unbalanced == []


def test_decline_becomes_arrears_and_suspends_above_the_limit(
    factory: sessionmaker[Session], settings: Settings, sandbox_url: str
) -> None:
    driver, _ = enrolled_driver(factory, sandbox_url, "insufficient_funds")
    big = settings.arrears_limit_fen + 1
    charge = open_and_run(factory, settings, SandboxProvider(sandbox_url), closed(driver), big)
    assert (charge.status, charge.failure_code) == (ChargeStatus.declined, "insufficient_funds")
    with factory() as db:
        rows = db.scalars(
            select(LogRow).where(LogRow.topic == ACCOUNT_EVENTS, LogRow.key == driver)
        ).all()
    snapshot = AccountUpdated.model_validate(CloudEvent.from_json(rows[-1].payload).data)
    assert snapshot.postpay == "suspended"
    with factory() as db:
        assert [c.id for c in charges.arrears_of(db, driver)] == [charge.id]


def _snapshots(factory: sessionmaker[Session], driver: str) -> list[AccountUpdated]:
    with factory() as db:
        rows = db.scalars(
            select(LogRow)
            .where(LogRow.topic == ACCOUNT_EVENTS, LogRow.key == driver)
            .order_by(LogRow.id)
        ).all()
    return [AccountUpdated.model_validate(CloudEvent.from_json(r.payload).data) for r in rows]


def test_the_account_snapshot_goes_out_only_when_postpay_changes(
    factory: sessionmaker[Session], settings: Settings, sandbox_url: str
) -> None:
    driver, agreement = enrolled_driver(factory, sandbox_url, "ok", 2_000)
    provider = SandboxProvider(sandbox_url)
    first = open_and_run(factory, settings, provider, closed(driver), 500)
    assert first.status == ChargeStatus.captured
    # The first state billing works out is published (the gate had none from it yet) ...
    assert [s.postpay for s in _snapshots(factory, driver)] == ["active"]
    for _ in range(3):  # ... captures that leave post-pay as it was add nothing
        assert open_and_run(factory, settings, provider, closed(driver), 400).status == "captured"
    assert [s.postpay for s in _snapshots(factory, driver)] == ["active"]
    # A decline above the limit suspends: published; paying it lifts it: published again.
    big = settings.arrears_limit_fen + 1
    owed = open_and_run(factory, settings, provider, closed(driver), big)
    assert owed.status == ChargeStatus.declined
    assert [s.postpay for s in _snapshots(factory, driver)] == ["active", "suspended"]
    httpx.post(f"{sandbox_url}/v1/agreements/{agreement}/deposits", json={"amount_fen": big})
    with factory() as db, db.begin():
        charges.pay_arrears(db, driver)
    with factory() as db, db.begin():
        charge = db.get(Charge, owed.id)
        assert charge is not None
        charges.advance(db, settings, {"sandbox": provider}, charge)
    snapshots = _snapshots(factory, driver)
    assert [s.postpay for s in snapshots] == ["active", "suspended", "active"]
    assert [s.version for s in snapshots] == sorted({s.version for s in snapshots})


def test_a_timeout_is_resolved_by_query_and_money_is_taken_once(
    factory: sessionmaker[Session], settings: Settings, sandbox_url: str
) -> None:
    driver, agreement = enrolled_driver(factory, sandbox_url, "timeout_then_ok", 10_000)
    provider = SandboxProvider(sandbox_url, timeout=1.0)
    event = closed(driver)
    charge = open_and_run(factory, settings, provider, event, 700, rounds=1)
    assert charge.status == ChargeStatus.unknown  # the answer never came
    with factory() as db, db.begin():
        charge = db.get(Charge, charge.id)
        assert charge is not None
        charges.advance(db, settings, {"sandbox": provider}, charge)  # queries, does not resend
    with factory() as db:
        charge = db.get(Charge, charge.id)
    assert charge is not None
    assert charge.status == ChargeStatus.captured
    balance = httpx.get(f"{sandbox_url}/v1/agreements/{agreement}").json()["balance_fen"]
    assert balance == 10_000 - 700


def test_flaky_provider_is_retried_until_captured(
    factory: sessionmaker[Session], settings: Settings, sandbox_url: str
) -> None:
    driver, _ = enrolled_driver(factory, sandbox_url, "flaky")
    charge = open_and_run(
        factory, settings, SandboxProvider(sandbox_url), closed(driver), 300, rounds=2
    )
    assert charge.status == ChargeStatus.captured
    assert charge.attempts == 1  # one refused call, then success


def test_free_stays_are_not_sent_to_the_provider(
    factory: sessionmaker[Session], settings: Settings, sandbox_url: str
) -> None:
    driver, _ = enrolled_driver(factory, sandbox_url, "ok")
    charge = open_and_run(factory, settings, SandboxProvider(sandbox_url), closed(driver), 0)
    assert charge.status == ChargeStatus.free
    assert charge.provider is None


def test_concurrent_charge_workers_never_take_a_charge_twice(
    factory: sessionmaker[Session], settings: Settings, sandbox_url: str
) -> None:
    driver, agreement = enrolled_driver(factory, sandbox_url, "ok", 1_000_000)
    events = [closed(driver) for _ in range(24)]
    for event in events:
        with factory() as db, db.begin():
            charges.open_charge(db, FixedPrice(100), event)  # type: ignore[arg-type]
    providers = {"sandbox": SandboxProvider(sandbox_url)}

    def work() -> None:
        while charges.process_due(factory, settings, providers, limit=5):
            pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    session_ids = [e.session_id for e in events]
    with factory() as db:
        found = db.scalars(select(Charge).where(Charge.session_id.in_(session_ids))).all()
        journals = db.scalars(
            select(Journal.ref_id).where(
                Journal.kind == "charge_captured", Journal.ref_id.in_([c.id for c in found])
            )
        ).all()
    assert sorted(c.status for c in found) == [ChargeStatus.captured] * 24
    assert sorted(journals) == sorted(c.id for c in found)  # one capture journal each
    balance = httpx.get(f"{sandbox_url}/v1/agreements/{agreement}").json()["balance_fen"]
    assert balance == 1_000_000 - 24 * 100
