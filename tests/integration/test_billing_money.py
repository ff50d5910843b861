"""Billing in depth against the payment sandbox running as its own process, on PostgreSQL,
Redis (db 10) and Kafka: every sandbox behaviour, notifications in any order, a billing process
killed between the provider's capture and the ledger write, refunds, settlement,
reconciliation, suspension at the gate, and a property over random money histories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from loadtests.ownership import proven_vehicle
from services.billing.charge import service as charges
from services.billing.charge.models import Charge, ChargeStatus
from services.billing.driver import service as drivers
from services.billing.driver.models import Driver, PaymentAccount
from services.billing.ledger import service as ledger
from services.billing.ledger.models import Journal
from services.billing.main import part as billing_part
from services.billing.provider.port import (
    Outcome,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from services.billing.provider.sandbox import SandboxProvider
from services.billing.refund import service as refunds
from services.billing.refund.models import Refund, RefundStatus
from services.gateway.gate.state import apply_account, decide
from shared.auth import Role, issue_admin_token, issue_driver_token
from shared.bus.consumer import ConsumerLoop
from shared.bus.kafka import KafkaBus, KafkaSubscription
from shared.bus.models import LogRow
from shared.events import AccountUpdated, CloudEvent, Decision
from shared.http import make_app
from shared.internal import InternalClient
from shared.runtime import Runtime, attach
from shared.settings import Settings
from shared.topics import ACCOUNT_EVENTS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SANDBOX_PORT = 18310
BILLING_PORT = 18311  # billing's HTTP in this process (notifications, admin and driver API)
BILLING_PROC_PORT = 18312  # billing as its own process, for the SIGKILL test
REDIS_DB = 10
NOTIFY_SECRET = "billing-tests-notify-secret-0123456789"

# Starts one part as its own process exactly as `citypark run <part>` serves it: the part's
# routers and workers in one app (without importing the other parts of the city).
LAUNCHER = """
import sys, threading, contextlib, uvicorn
from shared.http import make_app
from shared.runtime import Runtime, attach
from shared.settings import get_settings
from shared.logging import configure_logging
name, port = sys.argv[1], int(sys.argv[2])
if name == "billing":
    from services.billing.main import part
else:
    from services.paysandbox.main import part
settings = get_settings()
configure_logging("INFO", json=True)
rt = Runtime(settings, source=name)
part.on_startup(rt)
stop = threading.Event()
@contextlib.asynccontextmanager
async def lifespan(app):
    threads = [threading.Thread(target=w, args=(stop,), daemon=True) for w in part.workers(rt)]
    for t in threads: t.start()
    yield
    stop.set()
app = make_app(name, "")
app.router.lifespan_context = lifespan
attach(app, rt)
for r in part.routers: app.include_router(r)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def _env(s: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "CITYPARK_DATABASE_URL": s.database_url,
        "CITYPARK_REDIS_URL": s.redis_url,
        "CITYPARK_BUS": "log",  # this process's events stay in this suite's database
        "CITYPARK_CACHE": "redis",
        "CITYPARK_JWT_SECRET": s.jwt_secret.get_secret_value(),
        "CITYPARK_PAYSANDBOX_URL": s.paysandbox_url,
        "CITYPARK_PAYSANDBOX_NOTIFY_SECRET": NOTIFY_SECRET,
        "CITYPARK_SANDBOX_MODE": "true",
        "CITYPARK_BILLING_URL": f"http://127.0.0.1:{BILLING_PROC_PORT}",
        "CITYPARK_ARREARS_SWEEP_INTERVAL_S": "3600",
    }


def _start(name: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, name, str(port)],
        env=env,
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"{name} did not start:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cfg(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "paysandbox_url": f"http://127.0.0.1:{SANDBOX_PORT}",
            "paysandbox_notify_secret": SecretStr(NOTIFY_SECRET),
            "paysandbox_notify_url": f"http://127.0.0.1:{BILLING_PORT}"
            "/v1/providers/sandbox/notifications",
            "redis_url": settings.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}",
        }
    )


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("billing-money-logs")


@pytest.fixture(scope="module")
def sandbox(cfg: Settings, logs: Path) -> Iterator[str]:
    """The payment sandbox as its own process (with its notification worker)."""
    proc = _start("paysandbox", SANDBOX_PORT, _env(cfg), logs / "paysandbox.log")
    yield f"http://127.0.0.1:{SANDBOX_PORT}"
    _stop(proc)


@pytest.fixture(scope="module")
def rt(cfg: Settings) -> Runtime:
    runtime = Runtime(cfg, source="billing")
    billing_part.on_startup(runtime)
    return runtime


@pytest.fixture(scope="module")
def billing(rt: Runtime, sandbox: str) -> Iterator[httpx.Client]:
    """Billing's HTTP served from a thread (no workers: tests step the state machines)."""
    app = make_app("billing", "")
    attach(app, rt)
    for router in billing_part.routers:
        app.include_router(router)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=BILLING_PORT, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{BILLING_PORT}", timeout=10) as client:
        yield client
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def provider(rt: Runtime) -> SandboxProvider:
    p: SandboxProvider = rt.providers["sandbox"]
    return p


# --- small typed factories -------------------------------------------------------------


def agreement(sandbox: str, behaviour: str = "ok", balance_fen: int = 100_000) -> str:
    answer = httpx.post(
        f"{sandbox}/v1/agreements",
        json={"holder": "t", "balance_fen": balance_fen, "behaviour": behaviour},
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["agreement_no"])


def balance_of(sandbox: str, agreement_no: str) -> int:
    return int(httpx.get(f"{sandbox}/v1/agreements/{agreement_no}").json()["balance_fen"])


def enrolled(factory: sessionmaker[Session], agreement_no: str, plate: str | None = None) -> str:
    with factory() as db, db.begin():
        driver = Driver(phone=f"139{uuid.uuid4().int % 10**8:08d}")
        db.add(driver)
        db.flush()
        db.add(
            PaymentAccount(
                driver_id=driver.id,
                provider="sandbox",
                agreement_no=agreement_no,
                masked_account="****",
            )
        )
        if plate:
            db.add(proven_vehicle(driver.id, plate))
        return driver.id


def new_charge(
    factory: sessionmaker[Session],
    driver_id: str,
    amount_fen: int,
    *,
    operator_id: str | None = None,
    commission_bps: int = 0,
    exited_at: datetime | None = None,
    district: str | None = None,
) -> str:
    exited = exited_at or datetime.now(UTC)
    with factory() as db, db.begin():
        charge = Charge(
            session_id=str(uuid.uuid4()),
            driver_id=driver_id,
            lot_id="lot",
            lot_code="L",
            operator_id=operator_id or f"op-{uuid.uuid4().hex[:8]}",
            district=district,
            plate="苏E12345",
            plate_color="blue",
            entered_at=exited - timedelta(hours=1),
            exited_at=exited,
            amount_fen=amount_fen,
            commission_bps=commission_bps,
            breakdown={"lines": []},
        )
        db.add(charge)
        db.flush()
        return charge.id


def step(factory: sessionmaker[Session], cfg: Settings, rt: Runtime, charge_id: str) -> Charge:
    """One turn of the charge worker on one charge."""
    with factory() as db, db.begin():
        charge = db.scalar(select(Charge).where(Charge.id == charge_id).with_for_update())
        assert charge is not None
        if charge.status in (ChargeStatus.pending, ChargeStatus.unknown):
            charges.advance(db, cfg, rt.providers, charge)
    return get_charge(factory, charge_id)


def get_charge(factory: sessionmaker[Session], charge_id: str) -> Charge:
    with factory() as db:
        charge = db.get(Charge, charge_id)
        assert charge is not None
        return charge


def journals(factory: sessionmaker[Session], kind: str, ref_id: str) -> int:
    with factory() as db:
        return int(
            db.scalar(
                select(func.count())
                .select_from(Journal)
                .where(Journal.kind == kind, Journal.ref_id == ref_id)
            )
            or 0
        )


def assert_balanced(factory: sessionmaker[Session]) -> None:
    with factory() as db:
        balanced, total, _, unbalanced = ledger.check(db)
    assert (balanced, total, unbalanced) == (True, 0, [])


def wait_for(predicate: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def sign(body: bytes) -> str:
    import hashlib
    import hmac

    t = int(time.time())
    mac = hmac.new(NOTIFY_SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def post_notice(billing: httpx.Client, notice: dict[str, Any], signature: str | None = None):
    body = json.dumps(notice).encode()
    return billing.post(
        "/v1/providers/sandbox/notifications",
        content=body,
        headers={
            "content-type": "application/json",
            "x-sandbox-signature": signature or sign(body),
        },
    )


def admin(rt: Runtime, role: Role = Role.finance) -> dict[str, str]:
    token, _ = issue_admin_token(rt.secret, role)
    return {"authorization": f"Bearer {token}"}


def as_driver(rt: Runtime, driver_id: str) -> dict[str, str]:
    return {"authorization": f"Bearer {issue_driver_token(rt.secret, driver_id, 600)}"}


# --- the sandbox, one behaviour at a time ---------------------------------------------


def test_ok_captures_and_a_repeat_answers_the_first_result(
    sandbox: str, provider: SandboxProvider
) -> None:
    agr = agreement(sandbox, "ok", 10_000)
    key = str(uuid.uuid4())
    first = provider.charge(agreement_no=agr, out_trade_no=key, amount_fen=700, description="")
    again = provider.charge(agreement_no=agr, out_trade_no=key, amount_fen=700, description="")
    assert first.outcome is Outcome.captured
    assert (again.trade_no, again.captured_at) == (first.trade_no, first.captured_at)
    assert balance_of(sandbox, agr) == 10_000 - 700


def test_same_out_trade_no_with_another_amount_is_refused_never_debited(
    sandbox: str, provider: SandboxProvider
) -> None:
    agr = agreement(sandbox, "ok", 10_000)
    key = str(uuid.uuid4())
    provider.charge(agreement_no=agr, out_trade_no=key, amount_fen=700, description="")
    with pytest.raises(ProviderRejected) as refused:
        provider.charge(agreement_no=agr, out_trade_no=key, amount_fen=900, description="")
    assert refused.value.code == "out_trade_no_conflict"
    assert balance_of(sandbox, agr) == 10_000 - 700


@pytest.mark.parametrize(
    ("behaviour", "code"),
    [("insufficient_funds", "insufficient_funds"), ("frozen", "account_frozen")],
)
def test_declining_behaviours(
    sandbox: str, provider: SandboxProvider, behaviour: str, code: str
) -> None:
    agr = agreement(sandbox, behaviour, 10_000)
    result = provider.charge(
        agreement_no=agr, out_trade_no=str(uuid.uuid4()), amount_fen=500, description=""
    )
    assert (result.outcome, result.failure_code) == (Outcome.declined, code)
    assert balance_of(sandbox, agr) == 10_000


def test_a_cancelled_agreement_declines(sandbox: str, provider: SandboxProvider) -> None:
    agr = agreement(sandbox, "ok", 10_000)
    assert httpx.post(f"{sandbox}/v1/agreements/{agr}/cancel").json()["status"] == "cancelled"
    again = httpx.post(f"{sandbox}/v1/agreements/{agr}/cancel")
    assert (again.status_code, again.json()["code"]) == (409, "agreement_not_active")
    assert provider.get_agreement(agr).active is False  # type: ignore[union-attr]
    result = provider.charge(
        agreement_no=agr, out_trade_no=str(uuid.uuid4()), amount_fen=500, description=""
    )
    assert (result.outcome, result.failure_code) == (Outcome.declined, "agreement_cancelled")


def test_timeout_then_ok_takes_the_money_once_and_query_finds_it(sandbox: str) -> None:
    agr = agreement(sandbox, "timeout_then_ok", 10_000)
    impatient = SandboxProvider(sandbox, timeout=1.0)
    key = str(uuid.uuid4())
    with pytest.raises(ProviderTimeout):
        impatient.charge(agreement_no=agr, out_trade_no=key, amount_fen=800, description="")
    found = impatient.query(key)
    assert found is not None
    assert found.outcome is Outcome.captured
    resent = impatient.charge(agreement_no=agr, out_trade_no=key, amount_fen=800, description="")
    assert resent.trade_no == found.trade_no
    assert balance_of(sandbox, agr) == 10_000 - 800


def test_flaky_refuses_every_other_call(sandbox: str, provider: SandboxProvider) -> None:
    agr = agreement(sandbox, "flaky", 10_000)
    key = str(uuid.uuid4())
    with pytest.raises(ProviderUnavailable):
        provider.charge(agreement_no=agr, out_trade_no=key, amount_fen=300, description="")
    assert provider.query(key) is None  # the refusal took nothing
    ok = provider.charge(agreement_no=agr, out_trade_no=key, amount_fen=300, description="")
    assert ok.outcome is Outcome.captured
    assert balance_of(sandbox, agr) == 10_000 - 300


def test_slow_answers_late_but_right(sandbox: str, provider: SandboxProvider) -> None:
    agr = agreement(sandbox, "slow", 10_000)
    started = time.monotonic()
    result = provider.charge(
        agreement_no=agr, out_trade_no=str(uuid.uuid4()), amount_fen=300, description=""
    )
    assert time.monotonic() - started >= 1.4
    assert result.outcome is Outcome.captured


def test_duplicate_notify_delivers_twice_and_billing_applies_once(
    sandbox: str, factory: sessionmaker[Session], cfg: Settings, rt: Runtime, billing: httpx.Client
) -> None:
    agr = agreement(sandbox, "duplicate_notify", 10_000)
    charge_id = new_charge(factory, enrolled(factory, agr), 1_200)
    assert step(factory, cfg, rt, charge_id).status == ChargeStatus.captured

    from services.paysandbox.models import SandboxCharge, SandboxNotification

    with factory() as db:
        trade_no = db.get(SandboxCharge, charge_id).trade_no  # type: ignore[union-attr]

    def acked() -> int:
        with factory() as db:
            return int(
                db.scalar(
                    select(func.count())
                    .select_from(SandboxNotification)
                    .where(
                        SandboxNotification.body.contains(trade_no),
                        SandboxNotification.delivered_at.is_not(None),
                    )
                )
                or 0
            )

    wait_for(lambda: acked() == 2)
    assert journals(factory, "charge_captured", charge_id) == 1
    assert balance_of(sandbox, agr) == 10_000 - 1_200
    assert_balanced(factory)


# --- refunds at the sandbox -----------------------------------------------------------


def test_refunds_partial_full_idempotent_and_never_above_captured(
    sandbox: str, provider: SandboxProvider
) -> None:
    agr = agreement(sandbox, "ok", 10_000)
    key = str(uuid.uuid4())
    provider.charge(agreement_no=agr, out_trade_no=key, amount_fen=1_000, description="")
    r1 = str(uuid.uuid4())
    assert provider.refund(out_trade_no=key, out_refund_no=r1, amount_fen=400).amount_fen == 400
    # the same refund id again: the first result, no second refund
    provider.refund(out_trade_no=key, out_refund_no=r1, amount_fen=400)
    assert balance_of(sandbox, agr) == 10_000 - 1_000 + 400
    with pytest.raises(ProviderRejected) as too_much:
        provider.refund(out_trade_no=key, out_refund_no=str(uuid.uuid4()), amount_fen=601)
    assert too_much.value.code == "refund_exceeds_captured"
    over = httpx.post(
        f"{sandbox}/v1/refunds",
        json={"out_trade_no": key, "out_refund_no": str(uuid.uuid4()), "amount_fen": 601},
    )
    assert (over.status_code, over.json()["code"]) == (422, "refund_exceeds_captured")
    provider.refund(out_trade_no=key, out_refund_no=str(uuid.uuid4()), amount_fen=600)
    assert balance_of(sandbox, agr) == 10_000
    assert httpx.get(f"{sandbox}/v1/charges/{key}").json()["refunded_fen"] == 1_000


# --- notifications and the synchronous answer, in any order -----------------------------


def test_notice_before_the_answer_then_duplicates_have_one_effect(
    sandbox: str,
    provider: SandboxProvider,
    factory: sessionmaker[Session],
    cfg: Settings,
    rt: Runtime,
    billing: httpx.Client,
) -> None:
    agr = agreement(sandbox, "ok", 10_000)
    charge_id = new_charge(factory, enrolled(factory, agr), 900)
    # Our request reached the provider but its answer was lost: only the notice tells us.
    quiet = SandboxProvider(sandbox)  # no notify_url: this test delivers the notice itself
    sync = quiet.charge(agreement_no=agr, out_trade_no=charge_id, amount_fen=900, description="")
    notice = {
        "notify_id": f"N-{uuid.uuid4().hex}",
        "kind": "charge",
        "out_trade_no": charge_id,
        "trade_no": sync.trade_no,
        "amount_fen": 900,
        "status": "captured",
        "occurred_at": sync.captured_at.isoformat(),  # type: ignore[union-attr]
    }
    assert post_notice(billing, notice).json() == {"status": "applied"}
    assert post_notice(billing, notice).json() == {"status": "duplicate"}
    assert get_charge(factory, charge_id).status == ChargeStatus.captured
    # the worker has nothing left to do; a later notice with a new id changes nothing
    assert step(factory, cfg, rt, charge_id).status == ChargeStatus.captured
    notice["notify_id"] = f"N-{uuid.uuid4().hex}"
    assert post_notice(billing, notice).json() == {"status": "already_known"}
    assert journals(factory, "charge_captured", charge_id) == 1
    assert balance_of(sandbox, agr) == 10_000 - 900
    assert_balanced(factory)


def test_answer_before_notice_and_forged_notices(
    sandbox: str, factory: sessionmaker[Session], cfg: Settings, rt: Runtime, billing: httpx.Client
) -> None:
    agr = agreement(sandbox, "ok", 10_000)
    charge_id = new_charge(factory, enrolled(factory, agr), 650)
    captured = step(factory, cfg, rt, charge_id)  # the synchronous answer first
    assert captured.status == ChargeStatus.captured
    notice = {
        "notify_id": f"N-{uuid.uuid4().hex}",
        "kind": "charge",
        "out_trade_no": charge_id,
        "trade_no": captured.provider_trade_no,
        "amount_fen": 650,
        "status": "captured",
        "occurred_at": datetime.now(UTC).isoformat(),
    }
    assert post_notice(billing, notice).json() == {"status": "already_known"}
    forged = post_notice(billing, notice, signature="t=1,v1=00")
    assert (forged.status_code, forged.json()["code"]) == (401, "notification_signature_invalid")
    stale = json.dumps(notice).encode()
    old = sign(stale).replace(f"t={int(time.time())}", f"t={int(time.time()) - 3600}")
    assert post_notice(billing, notice, signature=old).status_code == 401
    unknown = post_notice(billing, {**notice, "notify_id": "x", "out_trade_no": "nope"})
    assert unknown.json() == {"status": "ignored"}
    garbage = billing.post(
        "/v1/providers/sandbox/notifications",
        content=b"[]",
        headers={"x-sandbox-signature": sign(b"[]")},
    )
    assert (garbage.status_code, garbage.json()["code"]) == (422, "validation_failed")
    assert journals(factory, "charge_captured", charge_id) == 1


# --- a billing process killed between the provider's capture and the ledger write -------


def test_sigkill_after_capture_before_ledger_write(
    sandbox: str, cfg: Settings, factory: sessionmaker[Session], logs: Path
) -> None:
    agr = agreement(sandbox, "slow", 10_000)  # the answer comes 1.5 s after the capture
    charge_id = new_charge(factory, enrolled(factory, agr), 1_500)
    env = _env(cfg)
    proc = _start("billing", BILLING_PROC_PORT, env, logs / "billing.log")
    try:

        def captured_at_provider() -> bool:
            answer = httpx.get(f"{sandbox}/v1/charges/{charge_id}")
            return answer.status_code == 200 and answer.json()["status"] == "captured"

        wait_for(captured_at_provider, 20)
        assert get_charge(factory, charge_id).status == ChargeStatus.pending  # not booked yet
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert get_charge(factory, charge_id).status == ChargeStatus.pending
        assert journals(factory, "charge_captured", charge_id) == 0
        proc = _start("billing", BILLING_PROC_PORT, env, logs / "billing.log")
        wait_for(lambda: get_charge(factory, charge_id).status == ChargeStatus.captured, 30)
    finally:
        _stop(proc)
    assert journals(factory, "charge_captured", charge_id) == 1
    assert balance_of(sandbox, agr) == 10_000 - 1_500  # exactly one capture
    assert_balanced(factory)


# --- disputes and refunds through the API -------------------------------------------------


def test_dispute_refunds_partially_then_fully_and_never_above_captured(
    sandbox: str, factory: sessionmaker[Session], cfg: Settings, rt: Runtime, billing: httpx.Client
) -> None:
    agr = agreement(sandbox, "ok", 10_000)
    driver = enrolled(factory, agr)
    operator = f"op-{uuid.uuid4().hex[:8]}"
    charge_id = new_charge(factory, driver, 1_000, operator_id=operator, commission_bps=600)
    step(factory, cfg, rt, charge_id)
    me = as_driver(rt, driver)
    opened = billing.post(
        f"/v1/me/charges/{charge_id}/disputes", json={"reason": "gate broke"}, headers=me
    )
    assert (opened.status_code, opened.json()["status"]) == (201, "open")
    twice = billing.post(f"/v1/me/charges/{charge_id}/disputes", json={"reason": "x"}, headers=me)
    assert (twice.status_code, twice.json()["code"]) == (409, "dispute_already_open")
    other = as_driver(rt, enrolled(factory, agr))
    assert (
        billing.post(
            f"/v1/me/charges/{charge_id}/disputes", json={"reason": "x"}, headers=other
        ).status_code
        == 404
    )
    dispute = opened.json()["id"]
    viewer = billing.post(
        f"/v1/admin/disputes/{dispute}/decision",
        json={"outcome": "refund", "amount_fen": 100},
        headers=admin(rt, Role.viewer),
    )
    assert viewer.status_code == 403
    too_much = billing.post(
        f"/v1/admin/disputes/{dispute}/decision",
        json={"outcome": "refund", "amount_fen": 1_001},
        headers=admin(rt),
    )
    assert (too_much.status_code, too_much.json()["code"]) == (422, "refund_exceeds_captured")
    approved = billing.post(
        f"/v1/admin/disputes/{dispute}/decision",
        json={"outcome": "refund", "amount_fen": 333},
        headers=admin(rt),
    )
    assert approved.json()["status"] == "refund_pending"
    refunds.process_due(factory, rt.providers)
    detail = billing.get(f"/v1/me/charges/{charge_id}", headers=me).json()
    assert detail["refunded_fen"] == 333
    assert detail["disputes"][0]["status"] == "refunded"
    assert detail["disputes"][0]["refund"]["status"] == "succeeded"
    # the rest, in a second dispute: commission comes back exactly in full
    second = billing.post(
        f"/v1/me/charges/{charge_id}/disputes", json={"reason": "all"}, headers=me
    ).json()
    billing.post(
        f"/v1/admin/disputes/{second['id']}/decision", json={"outcome": "refund"}, headers=admin(rt)
    )
    refunds.process_due(factory, rt.providers)
    assert get_charge(factory, charge_id).refunded_fen == 1_000
    third = billing.post(
        f"/v1/me/charges/{charge_id}/disputes", json={"reason": "more"}, headers=me
    ).json()
    nothing_left = billing.post(
        f"/v1/admin/disputes/{third['id']}/decision", json={"outcome": "refund"}, headers=admin(rt)
    )
    assert (nothing_left.status_code, nothing_left.json()["code"]) == (
        422,
        "refund_exceeds_captured",
    )
    rejected = billing.post(
        f"/v1/admin/disputes/{third['id']}/decision", json={"outcome": "reject"}, headers=admin(rt)
    )
    assert rejected.json()["status"] == "rejected"
    assert balance_of(sandbox, agr) == 10_000
    with factory() as db:
        # a full refund gives the commission back exactly and nets the operator to zero
        assert ledger.balance(db, ledger.city_commission(operator)) == 0
        assert ledger.balance(db, ledger.operator_payable(operator)) == -1_000
        assert ledger.balance(db, ledger.refunds(operator)) == 1_000
    assert_balanced(factory)


# --- settlement -----------------------------------------------------------------------


def test_settlement_is_derived_from_entries_and_rerun_is_identical(
    sandbox: str, factory: sessionmaker[Session], cfg: Settings, rt: Runtime, billing: httpx.Client
) -> None:
    agr = agreement(sandbox, "ok", 100_000)
    driver = enrolled(factory, agr)
    operator = f"op-{uuid.uuid4().hex[:8]}"
    ids = [
        new_charge(factory, driver, amount, operator_id=operator, commission_bps=600)
        for amount in (1_000, 333, 2_500)
    ]
    for charge_id in ids:
        step(factory, cfg, rt, charge_id)
    with factory() as db, db.begin():
        db.add(Refund(charge_id=ids[0], amount_fen=400))
    refunds.process_due(factory, rt.providers)
    # The day is over: these captures belong to a settled-later day of the past.
    day = date(2001, 1, 1) + timedelta(days=uuid.uuid4().int % 3000)
    with factory() as db, db.begin():
        refs = ids + list(db.scalars(select(Refund.id).where(Refund.charge_id == ids[0])))
        db.execute(update(Journal).where(Journal.ref_id.in_(refs)).values(business_date=day))
    finance = admin(rt)
    today = billing.post(
        "/v1/admin/settlements/runs",
        json={"date": str(date.today() + timedelta(days=1))},
        headers=finance,
    )
    assert (today.status_code, today.json()["code"]) == (409, "settlement_day_open")
    missing = billing.get("/v1/admin/settlements", params={"date": str(day)}, headers=finance)
    assert (missing.status_code, missing.json()["code"]) == (404, "settlement_not_run")
    first = billing.post("/v1/admin/settlements/runs", json={"date": str(day)}, headers=finance)
    assert first.status_code == 201
    mine = [s for s in first.json()["settlements"] if s["operator_id"] == operator]
    commission = 60 + 20 + 150 - 24  # half up per charge, 6 % of the 400 refunded given back
    assert mine == [
        {
            "operator_id": operator,
            "captured_fen": 3_833,
            "refunded_fen": 400,
            "commission_fen": commission,
            "payable_fen": 3_833 - 400 - commission,
            "adjustments": [],
            "adjustments_fen": 0,
            "payout_fen": 3_833 - 400 - commission,
        }
    ]
    again = billing.post("/v1/admin/settlements/runs", json={"date": str(day)}, headers=finance)
    assert (again.status_code, again.json()) == (200, first.json())
    csv_text = billing.get(
        "/v1/admin/settlements",
        params={"date": str(day)},
        headers={**finance, "accept": "text/csv"},
    ).text
    assert csv_text.splitlines()[0].startswith(
        "date,operator_id,captured_fen,refunded_fen,commission_fen,payable_fen"
    )
    assert f"{day},{operator},3833,400,{commission},{3_833 - 400 - commission}" in csv_text
    with factory() as db:
        # the payout journal closes the operator's accounts
        assert (
            ledger.balance(db, ledger.operator_payable(operator))
            + ledger.balance(db, ledger.refunds(operator))
            == 0
        )
    assert_balanced(factory)


# --- reconciliation ---------------------------------------------------------------------


def test_reconciliation_finds_each_kind_of_mismatch(
    sandbox: str,
    provider: SandboxProvider,
    factory: sessionmaker[Session],
    cfg: Settings,
    rt: Runtime,
    billing: httpx.Client,
) -> None:
    agr = agreement(sandbox, "ok", 100_000)
    driver = enrolled(factory, agr)
    good = new_charge(factory, driver, 500)
    step(factory, cfg, rt, good)
    # theirs only: the provider took money under a key we never booked
    stray = str(uuid.uuid4())
    provider.charge(agreement_no=agr, out_trade_no=stray, amount_fen=123, description="")
    # ours only: we booked a capture the provider does not have
    phantom = new_charge(factory, driver, 77)
    with factory() as db, db.begin():
        ledger.post(
            db,
            kind="charge_captured",
            ref_type="charge",
            ref_id=phantom,
            at=datetime.now(UTC),
            lines=ledger.capture_lines("sandbox", "op-x", 77, 0),
        )
    # both, with different amounts: the provider took 600 where we booked 640
    skewed = new_charge(factory, driver, 640)
    quiet = SandboxProvider(sandbox)
    theirs = quiet.charge(agreement_no=agr, out_trade_no=skewed, amount_fen=600, description="")
    with factory() as db, db.begin():
        charge = db.get(Charge, skewed)
        assert charge is not None
        assert charges.apply_notice(db, cfg, charge, theirs)
    today = ledger.business_date(datetime.now(UTC))
    answer = billing.post("/v1/admin/reconciliations", json={"date": str(today)}, headers=admin(rt))
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["status"] == "open"
    assert body["matched"] >= 1
    assert {"kind": "charge", "ref": stray, "out_trade_no": stray, "amount_fen": 123} in body[
        "missing_ours"
    ]
    assert {"kind": "charge", "ref": phantom, "out_trade_no": phantom, "amount_fen": 77} in body[
        "missing_theirs"
    ]
    assert {
        "kind": "charge",
        "ref": skewed,
        "out_trade_no": skewed,
        "ours_fen": 640,
        "theirs_fen": 600,
    } in body["amount_mismatch"]
    assert good not in json.dumps(body)  # matched, so listed nowhere
    listed = billing.get(
        "/v1/admin/reconciliations", params={"date": str(today)}, headers=admin(rt, Role.viewer)
    )
    assert body["id"] in [r["id"] for r in listed.json()]
    resolved = billing.post(
        f"/v1/admin/reconciliations/{body['id']}/resolution",
        json={"note": "booked by hand"},
        headers=admin(rt),
    )
    assert resolved.json()["status"] == "resolved"


# --- arrears and suspension, through Kafka to the gate's Redis state ---------------------


def billing_stats(rt: Runtime, billing: httpx.Client) -> dict[str, Any]:
    """Billing's share of /v1/admin/stats, from its internal API as the gateway reads it."""
    stats: dict[str, Any] = InternalClient(str(billing.base_url), rt.secret).call(
        "GET", "/internal/billing/stats?since=2000-01-01T00:00:00Z"
    )
    return stats


def test_settled_charges_and_arrears_are_counted_per_district(
    sandbox: str, factory: sessionmaker[Session], cfg: Settings, rt: Runtime, billing: httpx.Client
) -> None:
    here, there = (f"d{uuid.uuid4().hex[:8]}" for _ in range(2))
    payer = enrolled(factory, agreement(sandbox))
    poor = agreement(sandbox, "insufficient_funds", 100)
    debtor = enrolled(factory, poor)
    settled = [new_charge(factory, payer, fen, district=here) for fen in (650, 1_100)]
    settled.append(new_charge(factory, payer, 300, district=there))
    owed = [new_charge(factory, debtor, 500, district=here)]
    waiting = new_charge(factory, payer, 9_999, district=there)  # not sent yet: neither
    assert {step(factory, cfg, rt, c).status for c in settled} == {ChargeStatus.captured}
    assert step(factory, cfg, rt, owed[0]).status == ChargeStatus.declined
    assert get_charge(factory, waiting).status == ChargeStatus.pending

    stats = billing_stats(rt, billing)
    assert stats["by_district"][here] == {
        "postpay_drivers": 2,
        "charges_captured": 2,
        "captured_fen": 1_750,
        "charges_in_arrears": 1,
        "arrears_fen": 500,
    }
    assert stats["by_district"][there] == {
        "postpay_drivers": 1,
        "charges_captured": 1,
        "captured_fen": 300,
        "charges_in_arrears": 0,
        "arrears_fen": 0,
    }
    # The districts' shares are part of the city's totals.
    assert stats["captured_fen"] >= sum(d["captured_fen"] for d in stats["by_district"].values())
    assert stats["arrears_fen"] >= 500

    # Paying the arrears moves the money from one column to the other.
    httpx.post(f"{sandbox}/v1/agreements/{poor}/deposits", json={"amount_fen": 100_000})
    assert billing.post("/v1/me/arrears/payments", headers=as_driver(rt, debtor)).status_code == 202
    assert step(factory, cfg, rt, owed[0]).status == ChargeStatus.captured
    stats = billing_stats(rt, billing)
    assert stats["by_district"][here] == {
        "postpay_drivers": 2,
        "charges_captured": 3,
        "captured_fen": 2_250,
        "charges_in_arrears": 0,
        "arrears_fen": 0,
    }


@pytest.fixture
def gate_redis(cfg: Settings) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(cfg.redis_url, decode_responses=True)
    r.flushdb()
    yield r
    r.flushdb()


def _to_gate(
    factory: sessionmaker[Session],
    bus: KafkaBus,
    settings: Settings,
    topic: str,
    group: str,
    r: redis.Redis,
    driver_id: str,
) -> int:
    """Relay this driver's account snapshots to Kafka and let the gate's state consume them;
    returns how many there were."""
    with factory() as db, db.begin():
        rows = list(
            db.scalars(
                select(LogRow)
                .where(
                    LogRow.topic == ACCOUNT_EVENTS,
                    LogRow.key == driver_id,
                    LogRow.relayed_at.is_(None),
                )
                .order_by(LogRow.id)
            )
        )
        bus.publish_many([(topic, row.key, CloudEvent.from_json(row.payload)) for row in rows])
        for row in rows:
            row.relayed_at = datetime.now(UTC)
    if not rows:
        return 0
    stop = threading.Event()
    wanted = max(
        AccountUpdated.model_validate(CloudEvent.from_json(row.payload).data).version
        for row in rows
    )

    def handle(message: Any) -> None:
        data = AccountUpdated.opened(settings, message.event.data)
        apply_account(r, settings, data)
        if data.driver_id == driver_id and data.version >= wanted:
            stop.set()

    # The loop closes its subscription when it stops; the group's offsets carry on.
    sub = KafkaSubscription(settings.kafka_bootstrap, group, [topic])
    loop = ConsumerLoop("gate-test", sub, handle, stop=stop)
    threading.Timer(20, stop.set).start()
    loop.run()
    return len(rows)


def test_suspension_reaches_the_gate_and_clearing_lifts_it(
    sandbox: str,
    factory: sessionmaker[Session],
    cfg: Settings,
    rt: Runtime,
    billing: httpx.Client,
    topic: str,
    gate_redis: redis.Redis,
) -> None:
    agr = agreement(sandbox, "insufficient_funds", 100)
    plate = f"苏E{uuid.uuid4().int % 10**5:05d}"
    driver = enrolled(factory, agr, plate=plate)
    bus = KafkaBus(cfg.kafka_bootstrap, client_id="billing-tests")
    sub = f"gate-test-{uuid.uuid4().hex[:8]}"  # the gate's consumer group in this test
    try:
        with factory() as db, db.begin():
            drivers.publish_account_state(db, cfg, drivers.get_driver(db, driver))
        _to_gate(factory, bus, cfg, topic, sub, gate_redis, driver)
        assert (
            decide(gate_redis, cfg, plate=plate, color="blue", postpay_enabled=True).decision
            == Decision.postpay
        )

        big = new_charge(factory, driver, cfg.arrears_limit_fen + 1)
        assert step(factory, cfg, rt, big).status == ChargeStatus.declined
        _to_gate(factory, bus, cfg, topic, sub, gate_redis, driver)
        answer = decide(gate_redis, cfg, plate=plate, color="blue", postpay_enabled=True)
        assert (answer.decision, answer.reason) == (Decision.pay_on_site, "suspended_arrears")

        search = billing.get(
            "/v1/admin/arrears", params={"driver_id": driver}, headers=admin(rt, Role.viewer)
        )
        assert search.json()[0]["arrears_fen"] == cfg.arrears_limit_fen + 1
        assert search.json()[0]["postpay"] == "suspended"
        # searching by phone is a look-up of one person: finance may not, an admin with a
        # reason may, and a malformed phone is then refused as such
        assert (
            billing.get("/v1/admin/arrears", params={"phone": "12"}, headers=admin(rt)).status_code
            == 403
        )
        bad_phone = billing.get(
            "/v1/admin/arrears",
            params={"phone": "12", "unmasked": "true", "reason": "phone search test"},
            headers=admin(rt, Role.admin),
        )
        assert bad_phone.status_code == 422, bad_phone.text

        # the driver tops up and pays: post-pay comes back through the same path
        httpx.post(f"{sandbox}/v1/agreements/{agr}/deposits", json={"amount_fen": 100_000})
        paid = billing.post("/v1/me/arrears/payments", headers=as_driver(rt, driver))
        assert paid.status_code == 202
        assert step(factory, cfg, rt, big).status == ChargeStatus.captured
        _to_gate(factory, bus, cfg, topic, sub, gate_redis, driver)
        assert (
            decide(gate_redis, cfg, plate=plate, color="blue", postpay_enabled=True).decision
            == Decision.postpay
        )
        assert journals(factory, "arrears_opened", big) == 1
        assert journals(factory, "arrears_cleared", big) == 1
        with factory() as db:
            assert ledger.balance(db, ledger.driver_receivable(driver)) == 0

        # a small debt past the grace period suspends too, found by the periodic sweep
        httpx.post(f"{sandbox}/v1/agreements/{agr}/cancel")
        old = new_charge(factory, driver, 300)
        step(factory, cfg, rt, old)  # declined, small and fresh: still post-pay, ...
        # ... so the gate is told nothing new
        assert _to_gate(factory, bus, cfg, topic, sub, gate_redis, driver) == 0
        assert (
            decide(gate_redis, cfg, plate=plate, color="blue", postpay_enabled=True).decision
            == Decision.postpay
        )
        with factory() as db, db.begin():  # ... until the grace period passes
            past = datetime.now(UTC) - timedelta(days=cfg.arrears_grace_days, hours=1)
            db.execute(update(Charge).where(Charge.id == old).values(exited_at=past))
        with factory() as db, db.begin():
            assert charges.sweep_arrears(db, cfg) >= 1
        with factory() as db, db.begin():
            assert charges.sweep_arrears(db, cfg) == 0  # said once
        _to_gate(factory, bus, cfg, topic, sub, gate_redis, driver)
        answer = decide(gate_redis, cfg, plate=plate, color="blue", postpay_enabled=True)
        assert (answer.decision, answer.reason) == (Decision.pay_on_site, "suspended_arrears")
    finally:
        bus.close()
    assert_balanced(factory)


# --- the property: random money histories keep the books exact ---------------------------

Op = tuple[str, int, int]  # (what, which charge / behaviour index, amount)
BEHAVIOURS = ["ok", "ok", "flaky", "insufficient_funds", "duplicate_notify"]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("charge"), st.integers(0, len(BEHAVIOURS) - 1), st.integers(1, 5_000)),
        st.tuples(st.just("refund"), st.integers(0, 9), st.integers(1, 5_000)),
        st.tuples(st.just("crash"), st.integers(0, 9), st.just(0)),
        st.tuples(st.just("notice"), st.integers(0, 9), st.just(0)),
    ),
    min_size=1,
    max_size=10,
)


@hsettings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=ops, bps=st.integers(0, 1_000))
def test_random_histories_keep_the_ledger_at_zero_and_settlement_equal_to_entries(
    sandbox: str,
    factory: sessionmaker[Session],
    cfg: Settings,
    rt: Runtime,
    billing: httpx.Client,
    history: list[Op],
    bps: int,
) -> None:
    operator = f"op-{uuid.uuid4().hex[:8]}"
    made: list[str] = []
    for what, n, amount in history:
        if what == "charge":
            driver = enrolled(factory, agreement(sandbox, BEHAVIOURS[n], 20_000))
            made.append(
                new_charge(factory, driver, amount, operator_id=operator, commission_bps=bps)
            )
            for _ in range(3):  # the worker's turns (flaky needs two)
                step(factory, cfg, rt, made[-1])
        elif what == "crash" and made:
            # The provider is asked, then the process dies before commit: nothing booked.
            charge_id = made[n % len(made)]
            with factory() as db:
                db.begin()
                charge = db.get(Charge, charge_id)
                assert charge is not None
                if charge.status == ChargeStatus.pending:
                    charges.advance(db, cfg, rt.providers, charge)
                db.rollback()
            step(factory, cfg, rt, charge_id)
        elif what == "notice" and made:
            charge = get_charge(factory, made[n % len(made)])
            if charge.status != ChargeStatus.captured:
                continue  # the provider only notifies what it captured
            post_notice(
                billing,
                {
                    "notify_id": f"N-{uuid.uuid4().hex}",
                    "kind": "charge",
                    "out_trade_no": charge.id,
                    "trade_no": charge.provider_trade_no,
                    "amount_fen": charge.amount_fen,
                    "status": "captured",
                    "occurred_at": datetime.now(UTC).isoformat(),
                },
            )
        elif what == "refund" and made:
            charge = get_charge(factory, made[n % len(made)])
            if charge.status == ChargeStatus.captured:
                with factory() as db, db.begin():
                    room = refunds.refundable_fen(db, charge)
                    if room > 0:
                        db.add(Refund(charge_id=charge.id, amount_fen=min(amount, room)))
                refunds.process_due(factory, rt.providers)
    assert_balanced(factory)
    today = ledger.business_date(datetime.now(UTC))
    with factory() as db:
        days = [d for d in ledger.operator_days(db, today) if d.operator_id == operator]
        captured = list(
            db.scalars(
                select(Charge).where(
                    Charge.operator_id == operator, Charge.status == ChargeStatus.captured
                )
            )
        )
        done = list(
            db.scalars(
                select(Refund).where(
                    Refund.charge_id.in_([c.id for c in captured]),
                    Refund.status == RefundStatus.succeeded,
                )
            )
        )
        for c in captured:
            assert journals(factory, "charge_captured", c.id) == 1
    expected_commission = sum(ledger.commission_of(c.amount_fen, bps) for c in captured) - sum(
        r.commission_fen for r in done
    )
    expected = (
        sum(c.amount_fen for c in captured),
        sum(r.amount_fen for r in done),
        expected_commission,
    )
    got = (
        (days[0].captured_fen, days[0].refunded_fen, days[0].commission_fen) if days else (0, 0, 0)
    )
    assert got == expected
    if days:
        assert days[0].payable_fen == expected[0] - expected[1] - expected[2]
