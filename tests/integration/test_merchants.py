"""Merchant validation on PostgreSQL: merchants validate open parkings through their API key,
billing applies the validations when it prices the closed session (the lots service pricing the
shortened stay, as in production), the merchant owes what it gave in the ledger and in its
monthly statement. Lots, sessions, billing and the payment sandbox are composed in one app, as
the embedded city does, and reach each other over their internal HTTP APIs."""

from __future__ import annotations

import csv
import io
import random
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from services import city
from services.billing.charge import service as charges
from services.billing.charge.models import Charge, ChargeStatus
from services.billing.driver.models import Driver, PaymentAccount
from services.billing.ledger import service as ledger
from services.billing.merchant import service as merchants
from services.billing.provider.sandbox import SandboxProvider
from services.gateway import proxy
from services.lots.schemas import EXAMPLE_TARIFF
from services.sessions import service as sessions
from shared.auth import Role, issue_admin_token
from shared.bus.models import LogRow
from shared.events import (
    CloudEvent,
    Decision,
    EventType,
    Kind,
    ParkingEvent,
    SessionClosed,
    session_id_for,
)
from shared.internal import InternalClient
from shared.runtime import Runtime
from shared.settings import Settings
from shared.tariff import parse_tariff, quote
from shared.timeutil import utcnow

pytestmark = pytest.mark.integration

REDIS_DB = 14  # this suite's own Redis database
# The data keys of the integration settings: entries carry the plate sealed with them.
KEYS = Settings(jwt_secret=SecretStr("integration-secret-long-enough-for-hs256"))
SHANGHAI = ZoneInfo("Asia/Shanghai")
SANDBOX = "http://testserver/sandbox/pay"
TARIFF = parse_tariff(EXAMPLE_TARIFF)


@pytest.fixture(scope="module")
def rt(settings: Settings) -> Runtime:
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    return Runtime(settings.model_copy(update={"redis_url": url}), source="billing")


@pytest.fixture(scope="module")
def client(rt: Runtime) -> Iterator[TestClient]:
    redis.Redis.from_url(rt.settings.redis_url).flushdb()
    parts = [city.PARTS["lots"], city.PARTS["sessions"], city.PARTS["billing"]]
    for part in parts:
        part.on_startup(rt)
    sandbox_rt = Runtime(rt.settings, source="paysandbox")
    app = city.build_app(rt, parts, workers=[], mount_sandbox=sandbox_rt)
    with TestClient(app) as tc:
        for service in ("lots", "sessions", "billing"):
            rt.internal_clients[service] = InternalClient(
                "http://testserver", rt.secret, transport=tc._transport
            )
        rt.providers["sandbox"] = SandboxProvider(SANDBOX, transport=tc._transport)
        yield tc
    redis.Redis.from_url(rt.settings.redis_url).flushdb()


@pytest.fixture(scope="module", autouse=True)
def _no_charges_left_behind(rt: Runtime) -> Iterator[None]:
    """Most of these charges belong to no real driver: none may reach a later charge worker."""
    yield
    with rt.sessionmaker() as db, db.begin():
        db.execute(
            delete(Charge).where(
                Charge.lot_code.like("MV-%"),
                Charge.status.in_([ChargeStatus.pending, ChargeStatus.unknown]),
            )
        )


@pytest.fixture(scope="module")
def admin(rt: Runtime) -> dict[str, str]:
    token, _ = issue_admin_token(rt.secret, Role.admin)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def lot(client: TestClient, admin: dict[str, str]) -> dict[str, Any]:
    op = client.post(
        "/v1/admin/operators",
        headers=admin,
        json={"name": "merchants", "commission_bps": 600, "settlement_account": "x"},
    )
    assert op.status_code == 201, op.text
    answer = client.post(
        "/v1/admin/lots",
        headers=admin,
        json={
            "code": f"MV-{uuid.uuid4().hex[:10]}",
            "name": "商场停车场",
            "district": "gusu",
            "operator_id": op.json()["id"],
            "capacity": 300,
            "location": {"lat": 31.31, "lng": 120.62},
            "tariff": EXAMPLE_TARIFF,
        },
    )
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


def new_merchant(
    client: TestClient, admin: dict[str, str], lot: dict[str, Any], **limits: int
) -> dict[str, str]:
    """A merchant at the lot; returns its id and the headers carrying its API key."""
    answer = client.post(
        "/v1/admin/merchants",
        headers=admin,
        json={"lot_id": lot["id"], "name": f"shop-{uuid.uuid4().hex[:6]}", **limits},
    )
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["api_key"].startswith(body["key_prefix"])
    return {"id": body["id"], "Authorization": f"Bearer {body['api_key']}"}


def key(merchant: dict[str, str]) -> dict[str, str]:
    return {"Authorization": merchant["Authorization"]}


def a_plate() -> str:
    return f"苏E{random.randrange(10**5):05d}"


def day_at(hour: int, minute: int = 0, days_ago: int = 2) -> datetime:
    day = (utcnow() - timedelta(days=days_ago)).astimezone(SHANGHAI).date()
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=SHANGHAI)


def lot_event(
    lot: dict[str, Any], kind: Kind, plate: str, at: datetime, **extra: Any
) -> ParkingEvent:
    return ParkingEvent(
        event_id=str(uuid.uuid4()),
        kind=kind,
        lot_id=lot["id"],
        lot_code=lot["code"],
        district=lot["district"],
        operator_id=lot["operator_id"],
        plate=plate,
        plate_color="blue",
        occurred_at=at,
        received_at=utcnow(),
        **extra,
    )


def park(factory: sessionmaker[Session], lot: dict[str, Any], plate: str, at: datetime) -> str:
    """The sessions service receives the car's entry: an open session."""
    entry = lot_event(lot, Kind.entry, plate, at)
    with factory() as db, db.begin():
        sessions.handle_parking_event(db, EventType.parking_entry, entry, KEYS)
    return session_id_for(lot["id"], entry.event_id)


def leave(
    rt: Runtime,
    lot: dict[str, Any],
    plate: str,
    at: datetime,
    driver_id: str | None = None,
    decision: Decision = Decision.postpay,
) -> Charge | None:
    """The exit closes the session; billing consumes the closing event the sessions service
    wrote (twice, as a redelivery would) and opens the charge."""
    factory = rt.sessionmaker
    exit_ = lot_event(
        lot,
        Kind.exit,
        plate,
        at,
        decision=decision,
        reason=None if decision == Decision.postpay else "not_enrolled",
        driver_id=driver_id or str(uuid.uuid4()),
    )
    with factory() as db, db.begin():
        session = sessions.SessionRepository.from_session(db).get_open_by_vehicle(
            lot["id"], plate, "blue"
        )
        assert session is not None
        session_id = session.id
        sessions.handle_parking_event(db, EventType.parking_exit, exit_, rt.settings)
    with factory() as db:
        row = db.scalar(select(LogRow).where(LogRow.event_id == f"session-closed-{session_id}"))
    assert row is not None
    closed = SessionClosed.opened(rt.settings, CloudEvent.from_json(row.payload).data)
    opened_id = None
    for _ in range(2):
        with factory() as db, db.begin():
            opened = charges.open_charge(db, rt.internal("lots"), closed)
            opened_id = opened.id if opened else None
    if opened_id is None:
        return None
    with factory() as db:
        return db.get(Charge, opened_id)


def validate(
    client: TestClient, merchant: dict[str, str], plate: str, kind: str, value: int = 0
) -> httpx.Response:
    return client.post(
        "/v1/merchants/validations",
        headers=key(merchant),
        json={"plate": plate, "plate_color": "blue", "kind": kind, "value": value},
    )


def fee(entered: datetime, exited: datetime) -> int:
    """The oracle: SPEC §8's engine itself."""
    return quote(TARIFF, entered, exited, "small", "blue").fee_fen


def test_a_120_minute_validation_bills_the_shortened_stay_exactly(
    client: TestClient, rt: Runtime, admin: dict[str, str], lot: dict[str, Any]
) -> None:
    factory = rt.sessionmaker
    merchant = new_merchant(client, admin, lot)
    plate = a_plate()
    entered, exited = day_at(9), day_at(14)
    park(factory, lot, plate, entered)
    answer = validate(client, merchant, plate, "minutes", 120)
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert (created["status"], created["kind"], created["value"]) == ("pending", "minutes", 120)
    assert created["plate"] != plate  # masked on the way out

    charge = leave(rt, lot, plate, exited)
    assert charge is not None
    gross, shortened = fee(entered, exited), fee(entered, exited - timedelta(minutes=120))
    assert (gross, shortened) == (1700, 1100)  # the worked example, so the oracle is sane
    assert charge.amount_fen == shortened
    assert charge.validated_fen == gross - shortened == 600
    # The lots quote for the shortened stay agrees, line by line.
    quoted = client.post(
        "/v1/quotes",
        json={
            "lot_id": lot["id"],
            "entered_at": entered.isoformat(),
            "exited_at": (exited - timedelta(minutes=120)).isoformat(),
        },
    ).json()
    assert charge.breakdown["lines"] == quoted["breakdown"]
    assert charge.breakdown["gross_fen"] == gross
    assert [v["applied_fen"] for v in charge.breakdown["validations"]] == [600]
    # Delivered twice, applied once: one journal, the merchant owes 600.
    with factory() as db:
        assert ledger.balance(db, ledger.merchant_receivable(merchant["id"])) == 600
        assert ledger.balance(db, ledger.validations_deferred(lot["operator_id"])) == -600
    mine = client.get(f"/v1/merchants/validations/{created['id']}", headers=key(merchant)).json()
    assert (mine["status"], mine["applied_fen"], mine["charge_id"]) == (
        "applied",
        600,
        charge.id,
    )


def test_minutes_first_then_amounts_never_below_zero_and_full(
    client: TestClient, rt: Runtime, admin: dict[str, str], lot: dict[str, Any]
) -> None:
    factory = rt.sessionmaker
    shop, cafe = new_merchant(client, admin, lot), new_merchant(client, admin, lot)
    entered, exited = day_at(9), day_at(14)

    # An amount given before minutes still comes after them.
    plate = a_plate()
    park(factory, lot, plate, entered)
    assert validate(client, shop, plate, "amount", 300).status_code == 201
    assert validate(client, cafe, plate, "minutes", 60).status_code == 201
    charge = leave(rt, lot, plate, exited)
    assert charge is not None
    after_minutes = fee(entered, exited - timedelta(minutes=60))
    assert charge.amount_fen == after_minutes - 300
    applied = {v["merchant_id"]: v["applied_fen"] for v in charge.breakdown["validations"]}
    assert applied == {cafe["id"]: 1700 - after_minutes, shop["id"]: 300}
    assert [v["kind"] for v in charge.breakdown["validations"]] == ["minutes", "amount"]

    # An amount above the fee: free, and the merchant owes only the fee.
    plate = a_plate()
    park(factory, lot, plate, entered)
    assert validate(client, shop, plate, "amount", 50_000).status_code == 201
    charge = leave(rt, lot, plate, exited)
    assert charge is not None
    assert (charge.amount_fen, charge.validated_fen, charge.status) == (0, 1700, ChargeStatus.free)

    # `full`: the whole fee, whatever the stay.
    plate = a_plate()
    park(factory, lot, plate, day_at(8))
    assert validate(client, cafe, plate, "full").status_code == 201
    charge = leave(rt, lot, plate, day_at(20, 40))
    assert charge is not None
    assert charge.amount_fen == 0
    assert charge.validated_fen == fee(day_at(8), day_at(20, 40)) > 0

    # More minutes than the stay: billed from entry to entry, never before it.
    plate = a_plate()
    park(factory, lot, plate, entered)
    assert validate(client, shop, plate, "minutes", 24 * 60).status_code == 201
    charge = leave(rt, lot, plate, exited)
    assert charge is not None
    assert (charge.amount_fen, charge.validated_fen) == (0, 1700)
    assert datetime.fromisoformat(charge.breakdown["billed_exited_at"]) == entered

    # Minutes inside the free minutes: the shortened stay is free, as the engine says.
    plate = a_plate()
    park(factory, lot, plate, entered)
    assert validate(client, cafe, plate, "minutes", 50).status_code == 201
    charge = leave(rt, lot, plate, entered + timedelta(minutes=55))
    assert charge is not None
    assert fee(entered, entered + timedelta(minutes=55)) == 500
    assert charge.amount_fen == fee(entered, entered + timedelta(minutes=5)) == 0


def test_a_merchant_sees_and_undoes_only_its_own_validations(
    client: TestClient, rt: Runtime, admin: dict[str, str], lot: dict[str, Any]
) -> None:
    factory = rt.sessionmaker
    first, second = new_merchant(client, admin, lot), new_merchant(client, admin, lot)
    plate = a_plate()
    entered, exited = day_at(9), day_at(14)
    park(factory, lot, plate, entered)
    given = validate(client, first, plate, "amount", 400).json()

    assert client.get("/v1/merchants/validations", headers=key(second)).json() == []
    for method in ("GET", "DELETE"):
        answer = client.request(
            method, f"/v1/merchants/validations/{given['id']}", headers=key(second)
        )
        assert (answer.status_code, answer.json()["code"]) == (404, "not_found")
    own = client.get("/v1/merchants/validations", headers=key(first)).json()
    assert [v["id"] for v in own] == [given["id"]]
    assert client.get("/v1/merchants/me", headers=key(first)).json()["id"] == first["id"]

    # The second merchant's own validation; the first undoes its own before the exit.
    mine = validate(client, second, plate, "amount", 100).json()
    undone = client.delete(f"/v1/merchants/validations/{given['id']}", headers=key(first))
    assert (undone.status_code, undone.json()["status"]) == (200, "cancelled")
    again = client.delete(f"/v1/merchants/validations/{given['id']}", headers=key(first))
    assert (again.status_code, again.json()["code"]) == (409, "validation_not_pending")

    charge = leave(rt, lot, plate, exited)
    assert charge is not None
    assert (charge.amount_fen, charge.validated_fen) == (1700 - 100, 100)
    # Billed: final, it cannot be undone any more.
    late = client.delete(f"/v1/merchants/validations/{mine['id']}", headers=key(second))
    assert (late.status_code, late.json()["code"]) == (409, "validation_not_pending")
    with factory() as db:
        assert ledger.balance(db, ledger.merchant_receivable(first["id"])) == 0
        assert ledger.balance(db, ledger.merchant_receivable(second["id"])) == 100

    # A parking that ends without a post-pay charge: its validations lapse, nobody owes.
    plate = a_plate()
    park(factory, lot, plate, entered)
    lapsing = validate(client, first, plate, "full").json()
    assert leave(rt, lot, plate, exited, decision=Decision.pay_on_site) is None
    seen = client.get(f"/v1/merchants/validations/{lapsing['id']}", headers=key(first)).json()
    assert (seen["status"], seen["applied_fen"]) == ("lapsed", None)
    with factory() as db:
        assert ledger.balance(db, ledger.merchant_receivable(first["id"])) == 0


def test_limits_per_parking_and_per_day(
    client: TestClient, rt: Runtime, admin: dict[str, str], lot: dict[str, Any]
) -> None:
    factory = rt.sessionmaker
    merchant = new_merchant(client, admin, lot, per_session_limit=1, daily_limit=2)
    first, second, third = a_plate(), a_plate(), a_plate()
    for plate in (first, second, third):
        park(factory, lot, plate, day_at(9))
    given = validate(client, merchant, first, "minutes", 30).json()
    twice = validate(client, merchant, first, "amount", 100)
    assert (twice.status_code, twice.json()["code"]) == (409, "session_validation_limit")
    # Undoing gives the parking's allowance back.
    client.delete(f"/v1/merchants/validations/{given['id']}", headers=key(merchant))
    assert validate(client, merchant, first, "amount", 100).status_code == 201
    # Cancelled validations do not count towards the day either: 2 live ones are the limit.
    assert validate(client, merchant, second, "amount", 100).status_code == 201
    over = validate(client, merchant, third, "amount", 100)
    assert (over.status_code, over.json()["code"]) == (409, "merchant_daily_limit")
    # Another merchant at the same lot has its own allowance.
    other = new_merchant(client, admin, lot)
    assert validate(client, other, third, "amount", 100).status_code == 201


def test_unhappy_paths_are_problems(
    client: TestClient, rt: Runtime, admin: dict[str, str], lot: dict[str, Any]
) -> None:
    factory = rt.sessionmaker
    merchant = new_merchant(client, admin, lot)
    plate = a_plate()

    def problem(answer: httpx.Response) -> tuple[int, str]:
        assert answer.headers["content-type"].startswith("application/problem+json")
        return answer.status_code, answer.json()["code"]

    # Not inside; inside another car park; already gone.
    assert problem(validate(client, merchant, plate, "full")) == (409, "no_open_session")
    elsewhere = client.post(
        "/v1/admin/lots",
        headers=admin,
        json={
            "code": f"MV-{uuid.uuid4().hex[:10]}",
            "name": "another",
            "district": "gusu",
            "operator_id": lot["operator_id"],
            "capacity": 10,
            "location": {"lat": 31.3, "lng": 120.6},
            "tariff": EXAMPLE_TARIFF,
        },
    ).json()
    park(factory, elsewhere, plate, day_at(9))
    assert problem(validate(client, merchant, plate, "full")) == (409, "no_open_session")
    park(factory, lot, plate, day_at(9))
    leave(rt, lot, plate, day_at(10))
    assert problem(validate(client, merchant, plate, "full")) == (409, "no_open_session")

    # Keys.
    body = {"plate": plate, "plate_color": "blue", "kind": "full"}
    for headers in (
        {},
        {"Authorization": "Bearer cpm_not-a-key"},
        {"Authorization": merchant["Authorization"].replace("Bearer", "Basic")},
        admin,  # an admin token is no merchant key
    ):
        answer = client.post("/v1/merchants/validations", headers=headers, json=body)
        assert problem(answer) == (401, "api_key_invalid")
    assert problem(client.get("/v1/merchants/validations")) == (401, "api_key_invalid")

    # Payloads.
    assert problem(validate(client, merchant, "沪IO0000", "full")) == (422, "plate_invalid")
    for kind, value in [("minutes", 0), ("amount", 0), ("minutes", 10**6), ("hours", 1)]:
        assert problem(validate(client, merchant, plate, kind, value)) == (422, "validation_failed")

    # Ops' side.
    viewer, _ = issue_admin_token(rt.secret, Role.viewer)
    create = {"lot_id": lot["id"], "name": "x"}
    answer = client.post(
        "/v1/admin/merchants", headers={"Authorization": f"Bearer {viewer}"}, json=create
    )
    assert problem(answer) == (403, "forbidden")
    unknown = {"lot_id": str(uuid.uuid4()), "name": "x"}
    assert problem(client.post("/v1/admin/merchants", headers=admin, json=unknown)) == (
        404,
        "lot_unknown",
    )
    malformed = {"lot_id": "nope", "name": "x"}
    assert problem(client.post("/v1/admin/merchants", headers=admin, json=malformed))[0] == 422
    for month in ("2026-13", "26-01", "2026-1", "x"):
        answer = client.get(
            f"/v1/admin/merchants/{merchant['id']}/statements",
            params={"month": month},
            headers=admin,
        )
        assert problem(answer) == (422, "month_invalid")
    answer = client.get(
        f"/v1/admin/merchants/{uuid.uuid4()}/statements", params={"month": "2026-01"}, headers=admin
    )
    assert problem(answer) == (404, "not_found")


def test_the_ledger_balances_and_statements_equal_it(
    client: TestClient, rt: Runtime, admin: dict[str, str], lot: dict[str, Any]
) -> None:
    factory = rt.sessionmaker
    merchant = new_merchant(client, admin, lot, per_session_limit=3)
    agreement = client.post(
        "/sandbox/pay/v1/agreements",
        json={"holder": "t", "balance_fen": 100_000, "behaviour": "ok"},
    ).json()["agreement_no"]
    with factory() as db, db.begin():
        driver = Driver(phone=f"139{random.randrange(10**8):08d}")
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
        driver_id = driver.id

    billed: list[Charge] = []
    for minutes, amount in [(120, 0), (30, 200), (0, 99_999)]:
        plate = a_plate()
        park(factory, lot, plate, day_at(9))
        if minutes:
            assert validate(client, merchant, plate, "minutes", minutes).status_code == 201
        if amount:
            assert validate(client, merchant, plate, "amount", amount).status_code == 201
        charge = leave(rt, lot, plate, day_at(14), driver_id=driver_id)
        assert charge is not None
        billed.append(charge)
    # The charges with something left to pay are captured from the driver's account.
    for charge in billed:
        with factory() as db, db.begin():
            found = db.get(Charge, charge.id)
            assert found is not None
            if found.status == ChargeStatus.pending:
                charges.advance(db, rt.settings, rt.providers, found)
    with factory() as db:
        statuses = [db.get(Charge, c.id).status for c in billed]  # type: ignore[union-attr]
        balanced, total, _, unbalanced = ledger.check(db)
        owed = ledger.balance(db, ledger.merchant_receivable(merchant["id"]))
        month = utcnow().astimezone(SHANGHAI).strftime("%Y-%m")
        in_ledger = merchants.ledger_owed(db, merchant["id"], month)
    assert statuses == [ChargeStatus.captured, ChargeStatus.captured, ChargeStatus.free]
    assert (balanced, total, unbalanced) == (True, 0, [])
    given = sum(c.validated_fen for c in billed)
    assert owed == in_ledger == given == 600 + (1700 - fee(day_at(9), day_at(13, 30)) + 200) + 1700

    for path, headers in [
        (f"/v1/admin/merchants/{merchant['id']}/statements", admin),
        ("/v1/merchants/statements", key(merchant)),
    ]:
        answer = client.get(path, params={"month": month}, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(answer.text)))
        lines, total_row = rows[:-1], rows[-1]
        assert len(lines) == 4  # one row per validation
        assert sum(int(r["applied_fen"]) for r in lines) == in_ledger
        assert (total_row["applied_at"], int(total_row["applied_fen"])) == ("total", in_ledger)
        assert {r["charge_id"] for r in lines} == {c.id for c in billed}
        as_json = client.get(
            path, params={"month": month}, headers={**headers, "Accept": "application/json"}
        ).json()
        assert (as_json["validations"], as_json["total_fen"]) == (4, in_ledger)
    # Another month holds nothing of it.
    empty = client.get(
        "/v1/merchants/statements", params={"month": "2020-01"}, headers=key(merchant)
    )
    assert list(csv.reader(io.StringIO(empty.text))) == [
        merchants.CSV_COLUMNS,
        ["total", "", "", "", "", "", "0", "0"],
    ]
    # A merchant cannot read another's statement through the admin path.
    other = client.get(
        f"/v1/admin/merchants/{merchant['id']}/statements",
        params={"month": month},
        headers=key(merchant),
    )
    assert other.status_code == 401


def test_a_key_is_rotated_by_ops_or_by_the_merchant_and_the_old_one_dies_at_once(
    client: TestClient, admin: dict[str, str], lot: dict[str, Any]
) -> None:
    merchant = new_merchant(client, admin, lot)
    old = key(merchant)
    assert client.get("/v1/merchants/me", headers=old).status_code == 200

    # The merchant rotates its own key (e.g. a till replaced).
    mine = client.post("/v1/merchants/me/key", headers=old)
    assert mine.status_code == 200, mine.text
    assert (mine.json()["id"], mine.json()["api_key"].startswith(mine.json()["key_prefix"])) == (
        merchant["id"],
        True,
    )
    second = {"Authorization": f"Bearer {mine.json()['api_key']}"}
    assert client.get("/v1/merchants/me", headers=old).json()["code"] == "api_key_invalid"
    assert client.get("/v1/merchants/me", headers=second).json()["id"] == merchant["id"]

    # Ops rotate it after a leak: the leaked key is shut out, the new one works.
    by_ops = client.post(f"/v1/admin/merchants/{merchant['id']}/key", headers=admin)
    assert by_ops.status_code == 200, by_ops.text
    third = {"Authorization": f"Bearer {by_ops.json()['api_key']}"}
    assert client.post("/v1/merchants/me/key", headers=second).status_code == 401
    assert client.get("/v1/merchants/me", headers=third).status_code == 200
    assert len({old["Authorization"], second["Authorization"], third["Authorization"]}) == 3
    # Only admins rotate others' keys; an unknown merchant is a 404 problem.
    assert (
        client.post(f"/v1/admin/merchants/{merchant['id']}/key", headers=third).status_code == 401
    )
    missing = client.post(f"/v1/admin/merchants/{uuid.uuid4()}/key", headers=admin)
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")


def test_the_gateway_forwards_merchant_paths_to_billing(rt: Runtime) -> None:
    table = dict(proxy.routes(rt.settings))
    assert table["/v1/merchants"] == rt.settings.billing_url
    assert table["/v1/admin/merchants"] == rt.settings.billing_url
