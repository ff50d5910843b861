"""Phones and plates at rest: ciphertext in every table that holds them, found by blind index;
migrations convert rows written in clear; `keys rotate-data` moves every value to a new key."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from alembic import command
from citypark_connector import ConnectorClient
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Engine, MetaData, Table, create_engine, insert, select, text

from loadtests.ownership import backdate_verification, register_in_registry, verify
from services import city
from services.billing.driver.models import Driver
from services.keys_cli import encrypted_tables, rotate_data
from services.lots.schemas import EXAMPLE_TARIFF
from services.sessions.service import SessionRepository
from shared import pii
from shared.migrate import alembic_config
from shared.pii_columns import bind_data_keys, index_of
from shared.runtime import Runtime
from shared.settings import Settings
from tests.conftest import Infra, scratch_database
from tests.embedded_city import embedded_city, onboard_lot, wait_for

pytestmark = pytest.mark.integration
SHANGHAI = ZoneInfo("Asia/Shanghai")
PHONE, PLATE, PASS_PLATE = "13800007788", "苏E7A788", "苏E7P799"
K1, K2 = "k1-" + "a" * 40, "k2-" + "b" * 40
SECRET = SecretStr("data-at-rest-secret-of-32-bytes!!")


def keys(current: str, **extra: Any) -> dict[str, Any]:
    return {
        "data_keys": {"k1": SecretStr(K1), "k2": SecretStr(K2)},
        "data_key_id": current,
        **extra,
    }


def clear_text_hits(engine: Engine, needles: list[str]) -> list[tuple[str, str, str]]:
    """(table, column, value) of every text value in the encrypted tables that holds one of
    `needles` in clear, read with plain SQL."""
    hits = []
    with engine.connect() as conn:
        for t in {t.name for t in encrypted_tables()}:
            table = Table(t, MetaData(), autoload_with=conn)
            for row in conn.execute(select(table)).mappings():
                for col, value in row.items():
                    if isinstance(value, str) and any(n in value for n in needles):
                        hits.append((t, col, value))
    return hits


def encrypted_values(engine: Engine) -> list[str]:
    values = []
    with engine.connect() as conn:
        for t in encrypted_tables():
            for c in t.columns:
                values += conn.scalars(text(f"SELECT {c.name} FROM {t.name}")).all()
    return [v for v in values if v is not None]


def admin(client: TestClient) -> dict[str, str]:
    from services.gateway.tokens import service as admin_tokens
    from shared.auth import Role
    from shared.db import transaction

    rt = client.app.state.runtime  # type: ignore[attr-defined]
    with transaction(rt.sessionmaker) as db:
        return {"Authorization": f"Bearer {admin_tokens.create(db, rt.secret, Role.admin)}"}


def sign_in(client: TestClient, headers: dict[str, str]) -> dict[str, str]:
    assert client.post("/v1/auth/otp", json={"phone": PHONE}).status_code == 202
    sms = client.get("/v1/admin/sandbox/sms", params={"phone": PHONE}, headers=headers).json()
    # the newest message holding a code: the city may have texted the driver meanwhile
    code = next(m.group(0) for s in sms if (m := re.search(r"(?<!\d)\d{6}(?!\d)", s["body"])))
    token = client.post("/v1/auth/token", json={"phone": PHONE, "code": code}).json()
    return {"Authorization": f"Bearer {token['access_token']}"}


def park(connector: ConnectorClient, plate: str, exited: datetime) -> Any:
    connector.report_entry(
        plate=plate,
        plate_color="blue",
        vehicle_type="small",
        lane="E",
        occurred_at=exited - timedelta(minutes=61),
    )
    return connector.report_exit(plate=plate, plate_color="blue", lane="X", occurred_at=exited)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with embedded_city(tmp_path / "city.db", jwt_secret=SECRET, **keys("k1")) as tc:
        yield tc


def test_the_city_keeps_no_phone_or_plate_in_clear_and_rotates_its_key(
    client: TestClient,
) -> None:
    rt: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    headers = admin(client)
    _, pem = onboard_lot(client, headers, code="DAR-1", district="wuzhong", tariff=EXAMPLE_TARIFF)
    connector = ConnectorClient(
        "dar-1", pem, base_url="http://testserver", transport=client._transport
    )
    me = sign_in(client, headers)
    driver_id = client.get("/v1/me", headers=me).json()["id"]
    agreement = client.post(
        "/sandbox/pay/v1/agreements", json={"holder": "h", "balance_fen": 10_000}
    ).json()["agreement_no"]
    account = {"provider": "sandbox", "agreement_no": agreement}
    assert client.put("/v1/me/account", headers=me, json=account).status_code == 200
    vehicle = client.post(
        "/v1/me/vehicles", headers=me, json={"plate": PLATE, "plate_color": "blue"}
    ).json()
    proved = verify(
        client, me, vehicle["id"], owner_name="测试车主", vin=register_in_registry(client, PLATE)
    )
    assert proved.status_code == 200, proved.text
    backdate_verification(rt.sessionmaker, vehicle["id"], datetime.now(UTC) - timedelta(days=2))
    now = datetime.now(SHANGHAI) - timedelta(hours=2)
    connector.put_pass(
        "dar-pass",
        plate=PASS_PLATE,
        plate_color="blue",
        kind="whitelist",
        valid_from=now - timedelta(days=3),
        valid_to=now + timedelta(days=3),
    )
    # Pairing found the open session by the plate's blind index; the pass covers its plate.
    assert wait_for(lambda: park(connector, PLATE, now).decision == "postpay")
    assert park(connector, PASS_PLATE, now).decision == "free"
    wait_for(lambda: client.get("/v1/me/charges", headers=me).json())

    assert clear_text_hits(rt.engine, [PHONE, PHONE[-8:], PLATE, PASS_PLATE]) == []
    values = encrypted_values(rt.engine)
    assert len(values) >= 8
    assert all(v.startswith("pii1.k1.") for v in values), values
    # Look-ups still work: the same driver signs in again by phone and sees the plate.
    assert client.get("/v1/me", headers=sign_in(client, headers)).json()["id"] == driver_id
    assert [v["plate"] for v in client.get("/v1/me/vehicles", headers=me).json()] == [PLATE]

    before = set(encrypted_values(rt.engine))
    rotated = rotate_data(rt.engine, Settings(jwt_secret=SECRET, **keys("k2")))
    assert sum(r.changed for r in rotated) >= 8
    assert rotate_data(rt.engine, Settings(jwt_secret=SECRET, **keys("k2")))[0].changed == 0
    values = encrypted_values(rt.engine)
    # Every value there before is re-encrypted under k2; the running city, still writing
    # under k1 until its settings change, may have added a few meanwhile.
    assert not before & set(values)
    assert len([v for v in values if v.startswith("pii1.k2.")]) >= 8
    # The city, holding both keys, reads every value and goes on pairing and signing in.
    assert client.get("/v1/me", headers=sign_in(client, headers)).json()["id"] == driver_id
    later = now + timedelta(minutes=30)
    assert park(connector, PLATE, later).decision == "postpay"
    assert park(connector, PASS_PLATE, later).decision == "free"
    assert clear_text_hits(rt.engine, [PHONE, PLATE, PASS_PLATE]) == []


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'city.db'}"
        return
    infra: Infra = request.getfixturevalue("infra")
    with scratch_database(infra) as url:
        yield url


PREVIOUS = {"sessions": "sessions_0001", "lots": "lots_0004", "billing": "billing_0008"}


def migrate_to(settings: Settings, heads: dict[str, str]) -> None:
    for part in city.PARTS.values():
        if part.migrations:
            cfg = alembic_config(
                part.migrations.script_location,
                settings.database_url,
                part.migrations.version_table,
                settings,
            )
            command.upgrade(cfg, heads.get(part.name, "head"))


def test_migration_encrypts_rows_written_in_clear_and_look_ups_find_them(
    database_url: str,
) -> None:
    settings = Settings(database_url=database_url, jwt_secret=SECRET, **keys("k1"))
    migrate_to(settings, PREVIOUS)
    raw = create_engine(database_url)
    at = datetime(2026, 11, 25, 1, 0, tzinfo=UTC)
    driver_id, session_id = str(uuid.uuid4()), str(uuid.uuid4())
    with raw.begin() as conn:

        def add(name: str, **values: Any) -> None:
            conn.execute(insert(Table(name, MetaData(), autoload_with=conn)).values(**values))

        add("billing_driver", id=driver_id, phone=PHONE, state_version=0, created_at=at)
        add(
            "billing_vehicle",
            id=str(uuid.uuid4()),
            driver_id=driver_id,
            plate=PLATE,
            plate_color="blue",
            status="verified",
            created_at=at,
        )
        add(
            "sessions_session",
            id=session_id,
            lot_id="lot-1",
            lot_code="L",
            district="gusu",
            operator_id="op",
            plate=PLATE,
            plate_color="blue",
            vehicle_type="small",
            status="open",
            entry_event_id="lot-1/e1",
            entered_at=at,
            created_at=at,
            updated_at=at,
        )
    city.migrate(settings)  # from the previous heads to head

    assert clear_text_hits(raw, [PHONE, PLATE]) == []
    with raw.connect() as conn:
        stored = conn.execute(text("SELECT phone, phone_bidx FROM billing_driver")).one()
    assert pii.key_id_of(stored.phone) == "k1"
    assert stored.phone_bidx == index_of(settings, "phone", PHONE)
    rt = Runtime(settings, source="tests")
    with rt.sessionmaker() as db:
        bidx = index_of(settings, "phone", PHONE)
        assert db.scalars(select(Driver.id).where(Driver.phone_bidx == bidx)).one() == driver_id
        found = SessionRepository(db).get_open_by_vehicle("lot-1", PLATE, "blue")
        assert found is not None
        assert (found.id, found.plate) == (session_id, PLATE)

    # Down again, the plate is back in clear where the previous revision reads it.
    sessions = city.PARTS["sessions"].migrations
    assert sessions is not None
    cfg = alembic_config(sessions.script_location, database_url, sessions.version_table, settings)
    command.downgrade(cfg, "sessions_0001")
    with raw.connect() as conn:
        assert conn.scalar(text("SELECT plate FROM sessions_session")) == PLATE
    rt.engine.dispose()
    raw.dispose()


def test_reindex_under_a_new_index_key_keeps_look_ups_working(database_url: str) -> None:
    old = Settings(database_url=database_url, jwt_secret=SECRET, **keys("k1"))
    city.migrate(old)
    rt = Runtime(old, source="tests")
    with rt.sessionmaker() as db, db.begin():
        db.add(Driver(phone=PHONE))
    new = Settings(
        database_url=database_url,
        jwt_secret=SECRET,
        **keys("k1", data_index_key=SecretStr("new-index-key-" + "c" * 32)),
    )
    engine = bind_data_keys(create_engine(database_url), new)
    assert [
        r.changed for r in rotate_data(engine, new, reindex=True, dry_run=True) if r.changed
    ] == [1]
    assert [r.changed for r in rotate_data(engine, new, reindex=True) if r.changed] == [1]
    assert sum(r.changed for r in rotate_data(engine, new, reindex=True)) == 0
    with engine.connect() as conn:
        bidx = conn.scalar(text("SELECT phone_bidx FROM billing_driver"))
    assert bidx == index_of(new, "phone", PHONE) != index_of(old, "phone", PHONE)
    engine.dispose()
    rt.engine.dispose()


def test_a_value_under_a_key_the_process_lacks_fails_loudly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'city.db'}"
    writer = Settings(
        database_url=url,
        jwt_secret=SECRET,
        data_keys={"k9": SecretStr("k9-" + "d" * 40)},
        data_key_id="k9",
    )
    city.migrate(writer)
    with Runtime(writer, source="tests").sessionmaker() as db, db.begin():
        db.add(Driver(phone=PHONE))
    reader = Runtime(Settings(database_url=url, jwt_secret=SECRET, **keys("k1")), source="tests")
    with reader.sessionmaker() as db, pytest.raises(pii.DataKeyUnknown, match="k9"):
        db.scalars(select(Driver)).all()
    engine = bind_data_keys(create_engine(url), reader.settings)
    with pytest.raises(pii.DataKeyUnknown):
        rotate_data(engine, reader.settings)
    engine.dispose()
