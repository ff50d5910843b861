"""Money never falls between days: a capture or refund booked to a day whose settlement already
ran is paid by the next run as an adjustment, exactly once, also when runs race; and
`citypark ledger check` proves every captured charge and refund is in exactly one settlement.

Each backend (PostgreSQL, SQLite) gets a database of its own, migrated by `citypark migrate`'s
code. Money is booked with the ledger's own posting rules, on the day the provider moved it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Date, column, delete, func, select, table, update
from sqlalchemy.orm import Session, sessionmaker

from services import city
from services.billing.charge.models import Charge, ChargeStatus
from services.billing.ledger import service as ledger
from services.billing.ledger.models import Journal, LedgerEntry
from services.billing.refund.models import Refund, RefundStatus
from services.billing.settlement import endpoints as settlement_endpoints
from services.billing.settlement import service as settlements
from services.billing.settlement.models import Settlement, SettlementItem, SettlementRun
from shared.auth import Role, issue_admin_token
from shared.db import UTCDateTime
from shared.http import make_app
from shared.runtime import Runtime, attach
from shared.settings import Settings
from tests.conftest import Infra, scratch_database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SECRET = "settlement-tests-secret-of-32-bytes!"
DAY1, DAY2, DAY3, DAY4 = (date(2026, 3, d) for d in (1, 2, 3, 4))


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def cfg(request: pytest.FixtureRequest, infra: Infra, tmp_path_factory: Any) -> Iterator[Settings]:
    if request.param == "postgresql":
        with scratch_database(infra) as url:
            yield _migrated(url)
    else:
        yield _migrated(f"sqlite:///{tmp_path_factory.mktemp('settle') / 'city.db'}")


def _migrated(url: str) -> Settings:
    s = Settings(database_url=url, jwt_secret=SecretStr(SECRET))
    city.migrate(s)
    return s


@pytest.fixture(scope="module")
def rt(cfg: Settings) -> Iterator[Runtime]:
    runtime = Runtime(cfg, source="tests")
    yield runtime
    runtime.engine.dispose()


@pytest.fixture(scope="module")
def factory(rt: Runtime) -> sessionmaker[Session]:
    return rt.sessionmaker


@pytest.fixture(scope="module")
def api(rt: Runtime) -> Iterator[TestClient]:
    app = make_app("billing", "")
    attach(app, rt)
    app.include_router(settlement_endpoints.admin)
    token, _ = issue_admin_token(SECRET, Role.finance)
    with TestClient(app, headers={"authorization": f"Bearer {token}"}) as client:
        yield client


@pytest.fixture
def clean(factory: sessionmaker[Session]) -> Iterator[None]:
    """Each test starts with no settlement run, so its days are its own."""
    _wipe(factory)
    yield
    _wipe(factory)


def _wipe(factory: sessionmaker[Session]) -> None:
    with factory() as db, db.begin():
        for model in (SettlementItem, Settlement, SettlementRun, LedgerEntry, Journal):
            db.execute(delete(model))
        db.execute(delete(Refund))
        db.execute(delete(Charge))


# --- booking money the way the charge and refund workers book it -----------------------------


def at_noon(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 4, tzinfo=UTC)  # 12:00 in Asia/Shanghai


def capture(
    factory: sessionmaker[Session], operator: str, amount: int, day: date, bps: int = 600
) -> str:
    """A captured charge and its capture journal on `day`."""
    with factory() as db, db.begin():
        charge = Charge(
            session_id=str(uuid.uuid4()),
            driver_id=str(uuid.uuid4()),
            lot_id=str(uuid.uuid4()),
            lot_code="L1",
            operator_id=operator,
            plate="苏E12345",
            plate_color="blue",
            entered_at=at_noon(day) - timedelta(hours=1),
            exited_at=at_noon(day),
            amount_fen=amount,
            commission_bps=bps,
            breakdown={},
            status=ChargeStatus.captured,
            provider="sandbox",
            captured_at=at_noon(day),
        )
        db.add(charge)
        db.flush()
        fee = ledger.commission_of(amount, bps)
        ledger.post(
            db,
            kind=ledger.JournalKind.charge_captured,
            ref_type="charge",
            ref_id=charge.id,
            at=at_noon(day),
            lines=ledger.capture_lines("sandbox", operator, amount, fee),
        )
        return charge.id


def refund(factory: sessionmaker[Session], charge_id: str, amount: int, day: date) -> str:
    """A succeeded refund of part of a captured charge and its journal on `day`."""
    with factory() as db, db.begin():
        charge = db.get(Charge, charge_id)
        assert charge is not None
        taken_back = sum(
            db.scalars(
                select(Refund.commission_fen).where(
                    Refund.charge_id == charge_id, Refund.status == RefundStatus.succeeded
                )
            )
        )
        back = ledger.commission_back(
            amount, charge.commission_bps, charge.amount_fen, charge.refunded_fen, taken_back
        )
        row = Refund(
            charge_id=charge_id,
            amount_fen=amount,
            commission_fen=back,
            status=RefundStatus.succeeded,
            refunded_at=at_noon(day),
        )
        db.add(row)
        charge.refunded_fen += amount
        db.flush()
        ledger.post(
            db,
            kind=ledger.JournalKind.refund,
            ref_type="refund",
            ref_id=row.id,
            at=at_noon(day),
            lines=ledger.refund_lines("sandbox", charge.operator_id, amount, back),
        )
        return row.id


def run(api: TestClient, day: date) -> tuple[int, dict[str, Any]]:
    response = api.post("/v1/admin/settlements/runs", json={"date": day.isoformat()})
    assert response.status_code in (200, 201), response.text
    return response.status_code, response.json()


def of(result: dict[str, Any], operator: str) -> dict[str, Any]:
    mine = [s for s in result["settlements"] if s["operator_id"] == operator]
    assert len(mine) == 1, result
    return mine[0]


def owed_to(factory: sessionmaker[Session], operator: str) -> int:
    """What the ledger still owes the operator: 0 once every settlement paid everything."""
    with factory() as db:
        return -(
            ledger.balance(db, ledger.operator_payable(operator))
            + ledger.balance(db, ledger.refunds(operator))
        )


def coverage(factory: sessionmaker[Session]) -> Any:
    from services.billing.ledger.inclusion import check_settlements

    with factory() as db:
        balanced, total, _, unbalanced = ledger.check(db)
        assert (balanced, total, unbalanced) == (True, 0, [])
        return check_settlements(db)


# --- the tests --------------------------------------------------------------------------------


def test_a_capture_booked_late_to_a_settled_day_is_paid_by_the_next_run_once(
    clean: None, factory: sessionmaker[Session], api: TestClient
) -> None:
    op = f"op-{uuid.uuid4().hex[:8]}"
    capture(factory, op, 1_000, DAY1)  # commission 60
    status, first = run(api, DAY1)
    assert status == 201
    assert of(first, op)["payable_fen"] == 940
    assert owed_to(factory, op) == 0

    late = capture(factory, op, 333, DAY1)  # an `unknown` resolved after DAY1 was settled
    assert owed_to(factory, op) == 313  # 333 − 20
    # the settled day stays as it was, however often it is run again
    assert run(api, DAY1) == (200, first)

    capture(factory, op, 2_500, DAY2)  # commission 150
    status, second = run(api, DAY2)
    assert status == 201
    assert owed_to(factory, op) == 0  # the payout included the late capture
    mine = of(second, op)
    # the day's own money is unchanged by the adjustment, which is shown on its own
    assert (mine["captured_fen"], mine["commission_fen"], mine["payable_fen"]) == (
        2_500,
        150,
        2_350,
    )
    assert mine["adjustments"] == [
        {
            "date": DAY1.isoformat(),
            "kind": "capture",
            "reference": late,
            "captured_fen": 333,
            "refunded_fen": 0,
            "commission_fen": 20,
            "payable_fen": 313,
        }
    ]
    assert (mine["adjustments_fen"], mine["payout_fen"]) == (313, 2_350 + 313)
    assert owed_to(factory, op) == 0

    # never twice: the next runs have nothing more to carry, and re-runs change nothing
    _, third = run(api, DAY3)
    assert [s for s in third["settlements"] if s["operator_id"] == op] == []
    assert run(api, DAY2) == (200, second)
    assert owed_to(factory, op) == 0

    csv_text = api.get(
        "/v1/admin/settlements", params={"date": DAY2.isoformat()}, headers={"accept": "text/csv"}
    ).text
    lines = csv_text.splitlines()
    assert lines[0] == (
        "date,operator_id,captured_fen,refunded_fen,commission_fen,payable_fen,"
        "line,original_date,kind,reference"
    )
    assert f"{DAY2},{op},2500,0,150,2350,day,{DAY2},," in lines
    assert f"{DAY2},{op},333,0,20,313,adjustment,{DAY1},capture,{late}" in lines
    assert f"{DAY2},{op},2833,0,170,2663,payout,,," in lines
    assert coverage(factory).report()["problems"] == []


def test_a_refund_booked_late_to_a_settled_day_is_paid_by_the_next_run_once(
    clean: None, factory: sessionmaker[Session], api: TestClient
) -> None:
    op = f"op-{uuid.uuid4().hex[:8]}"
    charge = capture(factory, op, 2_000, DAY1, bps=500)  # commission 100
    _, first = run(api, DAY1)
    assert of(first, op)["payable_fen"] == 1_900

    # the refund is booked to DAY1 (the provider dates it there) after DAY1 was settled
    late = refund(factory, charge, 800, DAY1)  # commission back 40
    assert owed_to(factory, op) == -760  # the operator owes the refund back
    status, second = run(api, DAY2)
    assert status == 201
    assert owed_to(factory, op) == 0  # the payout took the late refund back
    mine = of(second, op)
    assert (mine["captured_fen"], mine["refunded_fen"], mine["payable_fen"]) == (0, 0, 0)
    assert mine["adjustments"] == [
        {
            "date": DAY1.isoformat(),
            "kind": "refund",
            "reference": late,
            "captured_fen": 0,
            "refunded_fen": 800,
            "commission_fen": -40,
            "payable_fen": -760,
        }
    ]
    assert mine["payout_fen"] == -760
    assert owed_to(factory, op) == 0
    _, third = run(api, DAY3)
    assert [s for s in third["settlements"] if s["operator_id"] == op] == []
    # all told: the capture minus commission, minus the refund with its commission back
    assert of(first, op)["payable_fen"] + mine["payout_fen"] == (2_000 - 100) - (800 - 40)
    assert coverage(factory).ok


def test_two_racing_runs_pay_a_late_item_once(
    clean: None,
    factory: sessionmaker[Session],
    api: TestClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    op = f"op-{uuid.uuid4().hex[:8]}"
    charge = capture(factory, op, 5_000, DAY1)
    run(api, DAY1)
    late = [capture(factory, op, 100 * (n + 1), DAY1) for n in range(5)]
    late_refund = refund(factory, charge, 1_000, DAY1)
    capture(factory, op, 700, DAY2)
    capture(factory, op, 900, DAY3)

    # Both runs read the unpaid journals before either inserts what it pays: on PostgreSQL the
    # two transactions truly overlap. On SQLite a writer holds the database's write lock from
    # its first statement, so the barrier times out and the runs go one after the other.
    postgres = factory.kw["bind"].dialect.name == "postgresql"
    wait_s = 30 if postgres else 2  # PostgreSQL: room for a busy machine
    barrier = threading.Barrier(2)
    original = settlements._candidates
    overlapped: list[bool] = []

    def both_read_first(db: Session, day: date) -> list[tuple[str, date, str, str]]:
        found = original(db, day)
        try:
            barrier.wait(timeout=wait_s)
            overlapped.append(True)
        except threading.BrokenBarrierError:
            overlapped.append(False)
        return found

    monkeypatch.setattr(settlements, "_candidates", both_read_first, raising=False)
    results: dict[date, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def settle(day: date) -> None:
        try:
            with factory() as db, db.begin():
                _, result = settlements.run(db, day)
            results[day] = result.model_dump(mode="json")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=settle, args=(d,)) for d in (DAY2, DAY3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert owed_to(factory, op) == 0  # every late item was paid
    if postgres:
        # both runs had read the same late journals when they began to insert
        assert overlapped == [True, True]
    carried = [a["reference"] for d in (DAY2, DAY3) for a in of(results[d], op)["adjustments"]]
    assert sorted(carried) == sorted([*late, late_refund])  # each once, by one run or the other
    assert owed_to(factory, op) == 0
    with factory() as db:
        assert db.scalar(select(func.count()).select_from(SettlementItem)) == 9

    # the same day run twice at once: one run, the other answers its stored result
    monkeypatch.setattr(settlements, "_candidates", original)
    capture(factory, op, 400, DAY4)
    same: list[tuple[bool, dict[str, Any]]] = []

    def settle_day4() -> None:
        try:
            with factory() as db, db.begin():
                created, result = settlements.run(db, DAY4)
            same.append((created, result.model_dump(mode="json")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=settle_day4) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(created for created, _ in same) == [False, True]
    assert same[0][1] == same[1][1]
    assert of(same[0][1], op)["payout_fen"] == 400 - 24
    assert owed_to(factory, op) == 0
    assert coverage(factory).ok


def test_ledger_check_catches_a_missing_item(
    clean: None, cfg: Settings, factory: sessionmaker[Session], api: TestClient
) -> None:
    op = f"op-{uuid.uuid4().hex[:8]}"
    capture(factory, op, 1_000, DAY1)
    dropped = capture(factory, op, 600, DAY1)
    run(api, DAY1)
    capture(factory, op, 300, DAY2)  # DAY2 not run yet: awaiting its first run
    capture(factory, op, 200, DAY1)  # booked to settled DAY1: awaits the next run
    good = coverage(factory)
    assert good.ok, good.problems
    assert (good.settled_items, good.awaiting_first_run, good.awaiting_adjustment) == (2, 1, 1)
    assert cli_check(cfg)[0] == 0

    # a settlement that says it paid a charge it does not list
    with factory() as db, db.begin():
        journal = db.scalar(select(Journal.id).where(Journal.ref_id == dropped))
        db.execute(delete(SettlementItem).where(SettlementItem.journal_id == journal))
    bad = coverage(factory)
    assert not bad.ok
    assert any(f"settlement {DAY1}/{op}: stored" in p for p in bad.problems), bad.problems
    code, report, stderr = cli_check(cfg)
    assert code == 1
    assert report["balanced"] is True  # the ledger itself is still balanced
    assert report["settlements"]["included_once"] is False
    assert "settlement:" in stderr

    # a captured charge the ledger never booked
    _wipe(factory)
    ghost = capture(factory, op, 500, DAY1)
    with factory() as db, db.begin():
        journal = db.scalar(select(Journal.id).where(Journal.ref_id == ghost))
        db.execute(delete(LedgerEntry).where(LedgerEntry.journal_id == journal))
        db.execute(delete(Journal).where(Journal.id == journal))
    assert any(ghost in p for p in coverage(factory).problems)

    # a late item a later run passed over (its run began long after it was booked)
    _wipe(factory)
    capture(factory, op, 1_000, DAY1)
    run(api, DAY1)
    passed_over = capture(factory, op, 250, DAY1)
    with factory() as db, db.begin():
        earlier = datetime.now(UTC) - timedelta(hours=2)
        db.execute(update(Journal).where(Journal.ref_id == passed_over).values(created_at=earlier))
        run_at = earlier - timedelta(hours=1)
        db.execute(
            update(SettlementRun).values(
                created_at=run_at, late_from=run_at - settlements.LATE_GRACE
            )
        )
        db.add(
            SettlementRun(
                business_date=DAY3,
                created_at=datetime.now(UTC),
                late_from=datetime.now(UTC) - settlements.LATE_GRACE,
            )
        )
    problems = coverage(factory).problems
    assert any(passed_over in p and "adjustment" in p for p in problems), problems


def cli_check(cfg: Settings) -> tuple[int, dict[str, Any], str]:
    import json

    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "ledger", "check"],
        env={
            **os.environ,
            "CITYPARK_DATABASE_URL": cfg.database_url,
            "CITYPARK_JWT_SECRET": SECRET,
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_upgrading_keeps_what_earlier_settlements_paid_and_carries_what_they_missed(
    backend: str, infra: Infra, tmp_path: Path
) -> None:
    """Settlements run before settlements recorded their items: the upgrade records what each
    one paid (the journals its stored figures sum), so the next run pays only what it missed."""
    from alembic import command

    from services.billing.main import part as billing
    from shared.db import make_engine, make_sessionmaker
    from shared.migrate import alembic_config
    from shared.pii_columns import bind_data_keys

    with (
        scratch_database(infra)
        if backend == "postgresql"
        else contextlib.nullcontext(f"sqlite:///{tmp_path / 'old.db'}")
    ) as url:
        assert billing.migrations is not None
        keys = Settings(database_url=url, jwt_secret=SecretStr(SECRET))
        config = alembic_config(
            billing.migrations.script_location, url, billing.migrations.version_table, keys
        )
        command.upgrade(config, "billing_0005")
        # the plates it writes are encrypted under this city's keys, as the migrations expect
        engine = bind_data_keys(make_engine(url), keys)
        if backend == "postgresql":
            # Today's model writes plates encrypted, wider than the column of that schema; the
            # upgrade under test is about settlements, not plates.
            with engine.begin() as conn:
                conn.exec_driver_sql(
                    "ALTER TABLE billing_charge ALTER COLUMN plate TYPE varchar(200)"
                )
        factory = make_sessionmaker(engine)
        op = f"op-{uuid.uuid4().hex[:8]}"
        now = datetime.now(UTC)
        seen = [capture(factory, op, amount, DAY1) for amount in (1_000, 500)]
        # committed an instant before the old run read the day, so that run never saw it
        unseen = capture(factory, op, 300, DAY1)
        late = capture(factory, op, 200, DAY1)  # booked after the run
        with factory() as db, db.begin():
            for ref, when in zip(
                [*seen, unseen, late],
                [now - timedelta(hours=3), now - timedelta(hours=2, minutes=30)]
                + [now - timedelta(hours=2, seconds=1), now - timedelta(minutes=30)],
                strict=True,
            ):
                db.execute(update(Journal).where(Journal.ref_id == ref).values(created_at=when))
            # what the run of DAY1 stored and paid, the way it did before items existed
            # (the run table as it was then: no `late_from` yet)
            db.execute(
                table(
                    "billing_settlement_run",
                    column("business_date", Date()),
                    column("created_at", UTCDateTime()),
                )
                .insert()
                .values(business_date=DAY1, created_at=now - timedelta(hours=2))
            )
            db.add(
                Settlement(
                    business_date=DAY1,
                    operator_id=op,
                    captured_fen=1_500,
                    refunded_fen=0,
                    commission_fen=90,
                    payable_fen=1_410,
                )
            )
            ledger.post(
                db,
                kind=ledger.JournalKind.settlement,
                ref_type="settlement",
                ref_id=f"{DAY1}:{op}",
                at=now,
                day=DAY1,
                lines=[
                    (ledger.operator_payable(op), 1_410),
                    (ledger.provider_clearing("sandbox"), -1_410),
                ],
            )
        command.upgrade(config, "head")
        with factory() as db:
            paid = {i.reference: i.settlement_date for i in db.scalars(select(SettlementItem))}
        assert paid == dict.fromkeys(seen, DAY1)
        assert owed_to(factory, op) == (300 - 18) + (200 - 12)
        assert coverage(factory).ok

        with factory() as db, db.begin():
            _, result = settlements.run(db, DAY2)
        mine = of(result.model_dump(mode="json"), op)
        assert sorted(a["reference"] for a in mine["adjustments"]) == sorted([unseen, late])
        assert owed_to(factory, op) == 0
        report = coverage(factory).report()
        assert (report["problems"], report["settled_items"]) == ([], 4)
        engine.dispose()
