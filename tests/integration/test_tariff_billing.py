"""A quote and a billed session for the same stay always agree, and tariff versions never
reprice what was billed: the lots API (PostgreSQL) answering quotes, and billing opening charges
through the lots internal price endpoint, as it does in production."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from services.billing.charge import service as charges
from services.billing.charge.models import Charge
from services.billing.consumers import closed_sessions_handler
from services.lots import passes as lot_passes
from services.lots.main import part as lots
from services.lots.models import TariffVersion
from services.lots.passes import PassKind, PassPut, PassWindow
from services.lots.schemas import EXAMPLE_TARIFF
from shared.auth import Role, issue_admin_token
from shared.bus.port import Message
from shared.errors import NotFound
from shared.events import Decision, EventType, SessionClosed, new_event
from shared.http import make_app
from shared.internal import InternalClient
from shared.plates import PlateColor
from shared.runtime import Runtime, attach
from shared.settings import Settings
from shared.tariff import parse_tariff, quote
from shared.timeutil import utcnow
from shared.topics import SESSIONS_CLOSED

pytestmark = pytest.mark.integration

REDIS_DB = 11  # this suite's own Redis database
SHANGHAI = ZoneInfo("Asia/Shanghai")


@pytest.fixture(scope="module")
def lots_settings(settings: Settings) -> Settings:
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    return settings.model_copy(update={"redis_url": url})


@pytest.fixture(scope="module")
def client(lots_settings: Settings) -> Iterator[TestClient]:
    redis.Redis.from_url(lots_settings.redis_url).flushdb()
    rt = Runtime(lots_settings, source="lots")
    lots.on_startup(rt)
    app = make_app("lots", "")
    attach(app, rt)
    for router in lots.routers:
        app.include_router(router)
    with TestClient(app) as tc:
        yield tc


@pytest.fixture(scope="module")
def lots_api(client: TestClient, lots_settings: Settings) -> InternalClient:
    """What billing holds: the lots internal API, here over the test client's transport."""
    return InternalClient(
        "http://testserver",
        lots_settings.jwt_secret.get_secret_value(),
        transport=client._transport,
    )


@pytest.fixture(scope="module")
def admin(lots_settings: Settings) -> dict[str, str]:
    token, _ = issue_admin_token(lots_settings.jwt_secret.get_secret_value(), Role.admin)
    return {"Authorization": f"Bearer {token}"}


def new_lot(client: TestClient, admin: dict[str, str], tariff: dict[str, Any]) -> dict[str, Any]:
    op = client.post(
        "/v1/admin/operators",
        headers=admin,
        json={"name": "tariffs", "commission_bps": 0, "settlement_account": "x"},
    ).json()
    answer = client.post(
        "/v1/admin/lots",
        headers=admin,
        json={
            "code": f"TB-{uuid.uuid4().hex[:10]}",
            "name": "tariffs",
            "district": "gusu",
            "operator_id": op["id"],
            "capacity": 50,
            "location": {"lat": 31.3, "lng": 120.6},
            "tariff": tariff,
        },
    )
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def lot(client: TestClient, admin: dict[str, str]) -> dict[str, Any]:
    return new_lot(client, admin, {**EXAMPLE_TARIFF, "green_free_minutes": 30})


@pytest.fixture(scope="module", autouse=True)
def _no_charges_left_behind(factory: sessionmaker[Session]) -> Iterator[None]:
    """These charges belong to no real driver: none may reach a later suite's charge worker."""
    yield
    with factory() as db, db.begin():
        db.execute(delete(Charge).where(Charge.lot_code.like("TB-%")))


def bill(
    factory: sessionmaker[Session],
    lots_api: InternalClient,
    lot: dict[str, Any],
    entered: datetime,
    exited: datetime,
    vehicle_type: str = "small",
    plate_color: str = "blue",
    session_id: str | None = None,
) -> Charge:
    """Billing receives the closed session and opens its charge, priced by the lots service."""
    closed = SessionClosed(
        session_id=session_id or str(uuid.uuid4()),
        lot_id=lot["id"],
        lot_code=lot["code"],
        district=lot["district"],
        operator_id=lot["operator_id"],
        plate="苏E12345",
        plate_color=plate_color,
        vehicle_type=vehicle_type,
        entered_at=entered,
        exited_at=exited,
        decision=Decision.postpay,
        driver_id=str(uuid.uuid4()),
    )
    with factory() as db, db.begin():
        charge = charges.open_charge(db, lots_api, closed)
        assert charge is not None
        return charge


def quoted(
    client: TestClient,
    lot: dict[str, Any],
    entered: datetime,
    exited: datetime,
    vehicle_type: str = "small",
    plate_color: str = "blue",
) -> dict[str, Any]:
    answer = client.post(
        "/v1/quotes",
        json={
            "lot_id": lot["id"],
            "entered_at": entered.isoformat(),
            "exited_at": exited.isoformat(),
            "vehicle_type": vehicle_type,
            "plate_color": plate_color,
        },
    )
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


NOW = utcnow().replace(microsecond=0)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    entry_offset_s=st.integers(0, 20 * 86_400),
    duration_s=st.one_of(st.integers(0, 3 * 3600), st.integers(0, 4 * 86_400)),
    vehicle_type=st.sampled_from(["small", "large"]),
    plate_color=st.sampled_from(list(PlateColor)),
)
def test_a_quote_and_the_billed_charge_always_agree(
    client: TestClient,
    lots_api: InternalClient,
    factory: sessionmaker[Session],
    lot: dict[str, Any],
    entry_offset_s: int,
    duration_s: int,
    vehicle_type: str,
    plate_color: PlateColor,
) -> None:
    entered = NOW - timedelta(seconds=entry_offset_s)
    exited = entered + timedelta(seconds=duration_s)
    answer = quoted(client, lot, entered, exited, vehicle_type, plate_color)
    charge = bill(factory, lots_api, lot, entered, exited, vehicle_type, plate_color)
    assert charge.amount_fen == answer["fee_fen"]
    assert charge.breakdown["lines"] == answer["breakdown"]
    assert answer["fee_fen"] == sum(line["amount_fen"] for line in answer["breakdown"])
    # Both agree with the engine itself, so neither is off in the same way.
    engine = quote(parse_tariff(lot["tariff"]), entered, exited, vehicle_type, plate_color)
    assert answer["fee_fen"] == engine.fee_fen


def test_the_worked_examples_through_the_api(
    client: TestClient,
    lots_api: InternalClient,
    factory: sessionmaker[Session],
    lot: dict[str, Any],
) -> None:
    day = (NOW - timedelta(days=2)).astimezone(SHANGHAI).date()

    def at(hour: int, minute: int) -> datetime:
        return datetime(day.year, day.month, day.day, hour, minute, tzinfo=SHANGHAI)

    for (h1, m1), (h2, m2), fee in [
        ((9, 0), (9, 15), 0),
        ((9, 0), (9, 16), 500),
        ((9, 0), (10, 1), 650),
        ((20, 0), (23, 30), 700),
    ]:
        assert quoted(client, lot, at(h1, m1), at(h2, m2))["fee_fen"] == fee
        assert bill(factory, lots_api, lot, at(h1, m1), at(h2, m2)).amount_fen == fee


def test_entry_time_version_prices_and_new_versions_never_reprice(
    client: TestClient,
    lots_api: InternalClient,
    factory: sessionmaker[Session],
    admin: dict[str, str],
) -> None:
    lot = new_lot(client, admin, EXAMPLE_TARIFF)
    entered = utcnow() - timedelta(hours=2)
    session_id = str(uuid.uuid4())
    billed = bill(factory, lots_api, lot, entered, utcnow(), session_id=session_id)
    old = parse_tariff(EXAMPLE_TARIFF)
    assert billed.amount_fen == quote(old, entered, billed.exited_at, "small", "blue").fee_fen
    assert billed.amount_fen == quoted(client, lot, entered, billed.exited_at)["fee_fen"]

    # A doubled price from a moment from now; stays entered before it keep the old one.
    doubled = {
        **EXAMPLE_TARIFF,
        "free_minutes": 0,
        "rates": {
            "small": {
                "periods": [
                    {"start": "00:00", "end": "00:00", "unit_minutes": 60, "unit_fen": 1000}
                ]
            }
        },
    }
    starts = utcnow() + timedelta(seconds=2)
    put = client.put(
        f"/v1/admin/lots/{lot['id']}/tariff",
        headers=admin,
        json={"effective_from": starts.isoformat(), "tariff": doubled},
    )
    assert put.status_code == 200, put.text
    refused = client.put(
        f"/v1/admin/lots/{lot['id']}/tariff",
        headers=admin,
        json={"effective_from": entered.isoformat(), "tariff": doubled},
    )
    assert (refused.status_code, refused.json()["code"]) == (422, "tariff_effective_in_past")
    time.sleep(max((starts - utcnow()).total_seconds(), 0) + 0.2)

    # The closed session: its charge and its quote are unchanged, even delivered again.
    again = bill(factory, lots_api, lot, entered, billed.exited_at, session_id=session_id)
    assert (again.id, again.amount_fen) == (billed.id, billed.amount_fen)
    assert quoted(client, lot, entered, billed.exited_at)["fee_fen"] == billed.amount_fen
    # A stay that entered before the change and leaves after it: the entry's version.
    straddling = bill(factory, lots_api, lot, entered, utcnow() + timedelta(minutes=1))
    assert straddling.amount_fen == quoted(client, lot, entered, straddling.exited_at)["fee_fen"]
    expected = quote(old, entered, straddling.exited_at, "small", "blue").fee_fen
    assert straddling.amount_fen == expected
    assert expected < 3 * 1000  # what the new version would have asked
    # A stay that entered after it: the new version.
    later = utcnow()
    fresh = bill(factory, lots_api, lot, later, later + timedelta(minutes=61))
    assert fresh.amount_fen == 2000
    assert quoted(client, lot, later, later + timedelta(minutes=61))["fee_fen"] == 2000
    history = client.get(f"/v1/admin/lots/{lot['id']}/tariffs", headers=admin).json()
    assert [v["in_force"] for v in history] == [True, False]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"lot_id": "nope"}, "lot_unknown"),
        ({"plate_color": "purple"}, "plate_color_invalid"),
        ({"vehicle_type": "bus"}, "validation_failed"),
        ({"exited_at": "2026-01-01T08:00:00+08:00"}, "validation_failed"),
        ({"entered_at": "2026-01-01T10:00:00"}, "validation_failed"),
        ({"exited_at": "2027-06-01T10:00:00+08:00"}, "stay_too_long"),
    ],
)
def test_bad_quotes_are_problems(
    client: TestClient, lot: dict[str, Any], change: dict[str, str], code: str
) -> None:
    body = {
        "lot_id": lot["id"],
        "entered_at": "2026-01-01T09:00:00+08:00",
        "exited_at": "2026-01-01T10:01:00+08:00",
        **change,
    }
    answer = client.post("/v1/quotes", json=body)
    assert answer.json()["code"] == code, answer.text
    assert answer.status_code in (404, 422)


class CountingLots:
    """The lots internal API as billing holds it, counting the calls billing makes."""

    def __init__(self, inner: InternalClient) -> None:
        self.inner = inner
        self.paths: list[str] = []

    def call(self, method: str, path: str, json: Any = None) -> Any:
        self.paths.append(path)
        return self.inner.call(method, path, json)


def closing(
    keys: Settings, lot: dict[str, Any], minutes: int, decision: Decision = Decision.postpay
) -> Message:
    exited = utcnow().replace(microsecond=0) - timedelta(minutes=1)
    data = SessionClosed(
        session_id=str(uuid.uuid4()),
        lot_id=lot["id"],
        lot_code=lot["code"],
        district=lot["district"],
        operator_id=lot["operator_id"],
        plate="苏E12345",
        plate_color="blue",
        vehicle_type="small",
        entered_at=exited - timedelta(minutes=minutes),
        exited_at=exited,
        decision=decision,
        driver_id=str(uuid.uuid4()),
    ).sealed(keys)  # sessions publishes the plate sealed
    event = new_event(EventType.session_closed, source="sessions", data=data)
    return Message(topic=SESSIONS_CLOSED, key=lot["id"], event=event, position="0")


def charges_of(factory: sessionmaker[Session], messages: list[Message]) -> dict[str, int]:
    ids = [m.event.data["session_id"] for m in messages]
    with factory() as db:
        rows = db.scalars(select(Charge).where(Charge.session_id.in_(ids))).all()
    return {c.session_id: c.amount_fen for c in rows}


def test_a_poll_is_priced_in_one_call_and_billed_as_each_alone(
    client: TestClient,
    lots_api: InternalClient,
    factory: sessionmaker[Session],
    lot: dict[str, Any],
    lots_settings: Settings,
) -> None:
    rt = Runtime(lots_settings, source="billing")
    counted = CountingLots(lots_api)
    rt.internal_clients["lots"] = counted  # type: ignore[assignment]
    handler = closed_sessions_handler(rt)
    stays = [closing(lots_settings, lot, m) for m in (10, 16, 61, 210, 24 * 60 + 5)]
    on_site = closing(lots_settings, lot, 90, Decision.pay_on_site)
    poll = [*stays, on_site, stays[1]]  # a redelivery inside the same poll

    handler.batch(poll)
    assert counted.paths == ["/internal/lots/prices"]  # one call for the whole poll
    billed = charges_of(factory, [*stays, on_site])
    expected = {}
    for m in stays:
        s = m.event.data
        expected[s["session_id"]] = quoted(
            client,
            lot,
            datetime.fromisoformat(s["entered_at"]),
            datetime.fromisoformat(s["exited_at"]),
        )["fee_fen"]
    assert billed == expected  # each as the quote for the stay says; none for the on-site one

    # The same poll delivered again changes nothing.
    handler.batch(poll)
    assert charges_of(factory, [*stays, on_site]) == expected

    # A stay lots cannot price spoils the poll's transaction, not its neighbours: the loop
    # then takes one message at a time, and only the bad one fails.
    gone = {**lot, "id": str(uuid.uuid4())}
    good, bad = closing(lots_settings, lot, 45), closing(lots_settings, gone, 45)
    with pytest.raises(NotFound):
        handler.batch([good, bad])
    assert charges_of(factory, [good, bad]) == {}
    handler(good)
    with pytest.raises(NotFound):
        handler(bad)
    assert list(charges_of(factory, [good, bad])) == [good.event.data["session_id"]]


def test_prices_in_one_call_equal_each_priced_alone(
    client: TestClient,
    admin: dict[str, str],
    lots_api: InternalClient,
    factory: sessionmaker[Session],
) -> None:
    """The batch reads tariff versions and passes once for all its stays; every stay still
    gets exactly the single call's price: versions by entry time, passes by vehicle."""
    lots = [new_lot(client, admin, EXAMPLE_TARIFF) for _ in range(2)]
    now = utcnow().replace(microsecond=0)
    flat = {
        **EXAMPLE_TARIFF,
        "free_minutes": 0,
        "rates": {
            "small": {
                "periods": [{"start": "00:00", "end": "00:00", "unit_minutes": 30, "unit_fen": 300}]
            }
        },
    }
    night = PassWindow(start="19:00", end="07:00")
    with factory() as db, db.begin():
        # A second version in force since three days ago (the API only takes future ones).
        db.add(
            TariffVersion(
                lot_id=lots[0]["id"], effective_from=now - timedelta(days=3), document=flat
            )
        )
        for lot in lots:
            lot_passes.put_pass(
                db,
                lot["id"],
                f"night-{uuid.uuid4().hex[:6]}",
                PassPut(
                    plate="苏E12345",
                    plate_color="blue",
                    kind=PassKind.monthly,
                    valid_from=now - timedelta(days=10),
                    valid_to=now + timedelta(days=10),
                    window=night,
                ),
            )
    stays = []
    for n in range(40):
        lot = lots[n % 2]
        entered = now - timedelta(days=6) + timedelta(minutes=397 * n)
        stays.append(
            {
                "lot_id": lot["id"],
                "entered_at": entered.isoformat(),
                "exited_at": (entered + timedelta(minutes=35 + 53 * n)).isoformat(),
                "vehicle_type": "small",
                "plate_color": "blue",
                "plate": ["苏E12345", "苏e 12345", "苏E54321", None][n % 4],
            }
        )
    stays.append({**stays[0], "lot_id": str(uuid.uuid4())})  # a car park nobody knows

    batch = lots_api.call("POST", "/internal/lots/prices", json={"items": stays})["items"]
    alone = []
    for stay in stays[:-1]:
        alone.append(lots_api.call("POST", f"/internal/lots/{stay['lot_id']}/price", json=stay))
    assert [item["price"] for item in batch[:-1]] == alone
    assert batch[-1] == {"price": None, "code": "lot_unknown", "detail": batch[-1]["detail"]}
    # Both versions and the pass took part, or the comparison proves little.
    fees = {a["fee_fen"] for a in alone}
    assert len(fees) > 10
    assert any(line["amount_fen"] == 0 for a in alone for line in a["breakdown"])
