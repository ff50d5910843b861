"""Roles and the one audit log, on PostgreSQL, Redis and Kafka, and on the embedded city.

Viewer and finance read plates and phones masked on every staff read that has them, viewers
read bank accounts masked; an admin reads them in full only with `unmasked=true` and a reason,
and that look-up is audited. Every admin and finance write of every service reaches the lots
service's audit log through the audit topic once, however often its event is delivered.
"""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services import city
from services.billing.charge.models import Charge, ChargeStatus
from services.billing.driver.models import Driver
from services.billing.provider.sandbox import SandboxProvider
from services.billing.refund.models import Dispute
from services.gateway.models import OfflineClaim
from services.lots import consumers as lots_consumers
from services.lots.schemas import EXAMPLE_TARIFF
from services.sessions.models import ParkingSession
from shared.auth import Role, issue_admin_token
from shared.bus.models import DeadLetter, LogRow
from shared.bus.outbox import enqueue, relay_once
from shared.events import CloudEvent, EventType
from shared.internal import InternalClient
from shared.masking import mask_phone, mask_plate
from shared.runtime import Runtime
from shared.settings import Settings
from shared.topics import AUDIT_EVENTS, ensure_topics
from tests.embedded_city import embedded_city, wait_for

pytestmark = pytest.mark.integration

REDIS_DB = 15  # this suite's own Redis database
SANDBOX = "http://testserver/sandbox/pay"
REASON = "chargeback 2026-117: the driver disputes having parked here"


def _headers(rt: Runtime, role: Role) -> tuple[dict[str, str], str]:
    token, token_id = issue_admin_token(rt.secret, role)
    return {"Authorization": f"Bearer {token}"}, token_id


def _plate() -> str:
    return "苏E" + "".join(random.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(5))


# ---------------------------------------------------------------------------------------------
# On the real servers: lots, sessions, billing and the gateway composed in one app over
# PostgreSQL, Redis and Kafka; the outbox relays and the audit consumer run when the test says.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rt(settings: Settings) -> Runtime:
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    return Runtime(settings.model_copy(update={"redis_url": url}), source="tests-roles")


@pytest.fixture(scope="module")
def client(rt: Runtime) -> Iterator[TestClient]:
    redis.Redis.from_url(rt.settings.redis_url).flushdb()
    ensure_topics(rt.settings.kafka_bootstrap, [AUDIT_EVENTS])
    parts = [city.PARTS[name] for name in ("gateway", "lots", "sessions", "billing")]
    for part in parts:
        part.on_startup(rt)
    sandbox_rt = Runtime(rt.settings, source="paysandbox")
    app = city.build_app(rt, parts, workers=[], mount_sandbox=sandbox_rt)
    with TestClient(app) as tc:
        for service in ("lots", "sessions", "billing"):
            rt.internal_clients[service] = InternalClient(
                "http://testserver", rt.secret, transport=tc._transport
            )
        # The mounted sandbox, through the test transport, with the credentials billing plugged.
        provider = SandboxProvider(SANDBOX, transport=tc._transport)
        plugged = rt.providers.get("sandbox")
        if isinstance(plugged, SandboxProvider) and "authorization" in plugged.http.headers:
            provider.http.headers["authorization"] = plugged.http.headers["authorization"]
        rt.providers["sandbox"] = provider
        yield tc
    redis.Redis.from_url(rt.settings.redis_url).flushdb()


@pytest.fixture(scope="module")
def staff(rt: Runtime) -> dict[Role, tuple[dict[str, str], str]]:
    return {role: _headers(rt, role) for role in Role}


@pytest.fixture(scope="module")
def parked(factory: sessionmaker[Session]) -> dict[str, str]:
    """A parking, a driver in arrears (with a phone), a dead letter carrying a plate and an
    offline gate decision the city did not back."""
    plate = _plate()
    phone = f"139{random.randrange(10**8):08d}"
    now = datetime.now(UTC)
    with factory() as db, db.begin():
        session = ParkingSession(
            lot_id=str(uuid.uuid4()),
            lot_code="RA-1",
            district="gusu",
            operator_id=str(uuid.uuid4()),
            plate=plate,
            plate_color="blue",
            vehicle_type="small",
            entry_event_id=f"roles/{uuid.uuid4()}",
            entered_at=now - timedelta(hours=2),
        )
        driver = Driver(phone=phone)
        db.add_all([session, driver])
        db.flush()
        db.add(
            Charge(
                session_id=str(uuid.uuid4()),
                driver_id=driver.id,
                lot_id="lot",
                lot_code="RA-1",
                operator_id=str(uuid.uuid4()),
                plate=plate,
                plate_color="blue",
                entered_at=now - timedelta(hours=3),
                exited_at=now - timedelta(hours=1),
                amount_fen=1_234,
                status=ChargeStatus.declined,
                breakdown={"lines": []},
            )
        )
        letter = DeadLetter(
            consumer="citypark-roles-test",
            topic=f"citypark.test.roles-{uuid.uuid4().hex[:8]}",
            event_id=str(uuid.uuid4()),
            payload=json.dumps(
                {
                    "id": str(uuid.uuid4()),
                    "source": "gateway",
                    "type": "citypark.parking.entry",
                    "time": now.isoformat(),
                    "data": {"plate": plate, "plate_color": "blue", "note": f"driver {phone}"},
                },
                ensure_ascii=False,
            ),
            error=f"KeyError: no lot for {plate}",
            reason="unexpected",
        )
        db.add(letter)
        claim_lot = str(uuid.uuid4())
        db.add(
            OfflineClaim(
                lot_id=claim_lot,
                event_id=str(uuid.uuid4()),
                lot_code="RA-1",
                plate=plate,
                plate_color="blue",
                claimed_decision="postpay",
                decided_at=now - timedelta(minutes=5),
                reason="not_eligible",
                decision="pay_on_site",
            )
        )
        db.flush()
        return {
            "plate": plate,
            "claim_lot": claim_lot,
            "phone": phone,
            "session_id": session.id,
            "driver_id": driver.id,
            "dead_letter_id": str(letter.id),
        }


def _sessions(client: TestClient, headers: dict[str, str], plate: str, **params: Any) -> Any:
    return client.get("/v1/admin/sessions", params={"plate": plate, **params}, headers=headers)


def test_viewer_and_finance_read_plates_and_phones_masked(
    client: TestClient, staff: dict[Role, tuple[dict[str, str], str]], parked: dict[str, str]
) -> None:
    plate, phone = parked["plate"], parked["phone"]
    for role in Role:  # admin too: the full plate is a look-up with a reason
        headers = staff[role][0]
        # Searching by a full plate is itself a look-up of one car's whereabouts.
        by_plate = _sessions(client, headers, plate)
        expected = (422, "reason_required") if role is Role.admin else (403, "unmasked_forbidden")
        assert (by_plate.status_code, by_plate.json()["code"]) == expected, by_plate.text
        found = client.get("/v1/admin/sessions", params={"limit": 500}, headers=headers)
        assert found.status_code == 200, found.text
        assert [s["plate"] for s in found.json() if s["id"] == parked["session_id"]] == [
            mask_plate(plate)
        ]
        assert plate not in found.text
        assert mask_plate(plate) != plate
        assert mask_plate(plate).startswith(plate[:2])

        owed = client.get(
            "/v1/admin/arrears", params={"driver_id": parked["driver_id"]}, headers=headers
        ).json()
        assert [(d["phone"], d["arrears_fen"]) for d in owed] == [(mask_phone(phone), 1_234)]

        letters = client.get(
            "/v1/admin/dead-letters", params={"consumer": "citypark-roles-test"}, headers=headers
        )
        assert letters.status_code == 200, letters.text
        [letter] = letters.json()["dead_letters"]
        assert plate not in letter["payload"]
        assert phone not in letter["payload"]
        assert json.loads(letter["payload"])["data"]["plate"] == mask_plate(plate)
        assert mask_phone(phone) in letter["payload"]
        assert letter["error"] == f"KeyError: no lot for {mask_plate(plate)}"

        claims = client.get(
            "/v1/admin/unbacked-claims", params={"lot_id": parked["claim_lot"]}, headers=headers
        )
        assert [c["plate"] for c in claims.json()] == [mask_plate(plate)], claims.text


def test_unmasked_look_ups_are_for_admins_with_a_reason(
    client: TestClient, staff: dict[Role, tuple[dict[str, str], str]], parked: dict[str, str]
) -> None:
    plate, admin = parked["plate"], staff[Role.admin][0]
    missing = _sessions(client, admin, plate, unmasked="true")
    assert (missing.status_code, missing.json()["code"]) == (422, "reason_required")
    short = _sessions(client, admin, plate, unmasked="true", reason="x")
    assert (short.status_code, short.json()["code"]) == (422, "validation_failed")
    for role in (Role.viewer, Role.finance):
        refused = _sessions(client, staff[role][0], plate, unmasked="true", reason=REASON)
        assert (refused.status_code, refused.json()["code"]) == (403, "unmasked_forbidden")

    full = _sessions(client, admin, plate, unmasked="true", reason=REASON)
    assert [s["plate"] for s in full.json()] == [plate]
    owed = client.get(
        "/v1/admin/arrears",
        params={"driver_id": parked["driver_id"], "unmasked": "true", "reason": REASON},
        headers=admin,
    ).json()
    assert [d["phone"] for d in owed] == [parked["phone"]]
    letters = client.get(
        "/v1/admin/dead-letters",
        params={"consumer": "citypark-roles-test", "unmasked": "true", "reason": REASON},
        headers=admin,
    ).json()
    assert json.loads(letters["dead_letters"][0]["payload"])["data"]["plate"] == plate
    claims = client.get(
        "/v1/admin/unbacked-claims",
        params={"lot_id": parked["claim_lot"], "unmasked": "true", "reason": REASON},
        headers=admin,
    ).json()
    assert [c["plate"] for c in claims] == [plate]


def test_bank_accounts_are_for_finance_and_admin(
    client: TestClient, staff: dict[Role, tuple[dict[str, str], str]]
) -> None:
    account = f"62220202{random.randrange(10**8):08d}"
    created = client.post(
        "/v1/admin/operators",
        headers=staff[Role.admin][0],
        json={
            "name": f"roles {uuid.uuid4().hex[:6]}",
            "commission_bps": 0,
            "settlement_account": account,
        },
    )
    assert created.status_code == 201, created.text
    op = created.json()
    seen = {
        role: client.get(f"/v1/admin/operators/{op['id']}", headers=staff[role][0]).json()
        for role in Role
    }
    assert seen[Role.admin]["settlement_account"] == account
    assert seen[Role.finance]["settlement_account"] == account
    assert seen[Role.viewer]["settlement_account"] == "****" + account[-4:]
    listed = client.get(
        "/v1/admin/operators", params={"q": op["name"]}, headers=staff[Role.viewer][0]
    ).json()
    assert [o["settlement_account"] for o in listed["items"]] == ["****" + account[-4:]]

    # The audit log's snapshot of the new operator does not give it away either.
    def entry(role: Role) -> dict[str, Any]:
        items = client.get(
            "/v1/admin/audit",
            params={"entity": "operator", "entity_id": op["id"]},
            headers=staff[role][0],
        ).json()["items"]
        [found] = items
        return found  # type: ignore[no-any-return]

    assert entry(Role.viewer)["after"]["settlement_account"] == "****" + account[-4:]
    assert entry(Role.finance)["after"]["settlement_account"] == account
    assert entry(Role.admin)["service"] == "lots"


def _drained(bootstrap: str, group: str) -> bool:
    """Has the group committed everything on the audit topic up to now? (Asked as the group,
    without joining it.)"""
    probe = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        client_id="roles-tests",
        enable_auto_commit=False,
    )
    try:
        probe.topics()  # loads the cluster's metadata
        numbers = probe.partitions_for_topic(AUDIT_EVENTS) or set()
        parts = [TopicPartition(AUDIT_EVENTS, p) for p in numbers]
        ends = probe.end_offsets(parts)
        return bool(parts) and all(
            ends[tp] == 0 or (probe.committed(tp) or 0) >= ends[tp] for tp in parts
        )
    finally:
        probe.close()


def _consume(rt: Runtime, group: str) -> None:
    """Run the lots service's audit consumer until it has taken everything on the topic."""
    stop = threading.Event()
    [work] = lots_consumers.audit_workers(rt, group=group)
    thread = threading.Thread(target=work, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: _drained(rt.settings.kafka_bootstrap, group), timeout_s=60)
    finally:
        stop.set()
        thread.join(timeout=30)


def _relay(rt: Runtime) -> None:
    for source in ("billing", "sessions", "gateway"):
        while relay_once(rt.sessionmaker, rt.bus, source):
            pass


def test_every_audited_write_of_every_service_is_in_the_one_log_once(
    client: TestClient,
    rt: Runtime,
    factory: sessionmaker[Session],
    parked: dict[str, str],
) -> None:
    admin, admin_id = _headers(rt, Role.admin)
    finance, finance_id = _headers(rt, Role.finance)
    viewer, _ = _headers(rt, Role.viewer)

    # lots (straight into the log): an operator and a car park
    op = client.post(
        "/v1/admin/operators",
        headers=admin,
        json={"name": "audited", "commission_bps": 500, "settlement_account": "6222000011112222"},
    ).json()
    lot = client.post(
        "/v1/admin/lots",
        headers=admin,
        json={
            "code": f"RA-{uuid.uuid4().hex[:8]}",
            "name": "audited lot",
            "district": "gusu",
            "operator_id": op["id"],
            "capacity": 10,
            "location": {"lat": 31.3, "lng": 120.6},
            "tariff": EXAMPLE_TARIFF,
        },
    )
    assert lot.status_code == 201, lot.text
    lot_id = lot.json()["id"]

    # billing: a merchant and its key, a dispute decided, a settlement run, a reconciliation
    # run and resolved
    merchant = client.post(
        "/v1/admin/merchants", headers=admin, json={"lot_id": lot_id, "name": "书店"}
    )
    assert merchant.status_code == 201, merchant.text
    merchant_id = merchant.json()["id"]
    rotated = client.post(f"/v1/admin/merchants/{merchant_id}/key", headers=admin)
    assert rotated.status_code == 200, rotated.text
    with factory() as db, db.begin():
        charge = db.scalar(select(Charge).where(Charge.driver_id == parked["driver_id"]))
        assert charge is not None
        dispute = Dispute(charge_id=charge.id, driver_id=parked["driver_id"], reason="never here")
        db.add(dispute)
        db.flush()
        dispute_id = dispute.id
    decided = client.post(
        f"/v1/admin/disputes/{dispute_id}/decision", headers=finance, json={"outcome": "reject"}
    )
    assert decided.status_code == 200, decided.text
    day = date(2021, 1, 1) + timedelta(days=random.randrange(1500))
    settled = client.post("/v1/admin/settlements/runs", headers=finance, json={"date": str(day)})
    assert settled.status_code == 201, settled.text
    again = client.post("/v1/admin/settlements/runs", headers=finance, json={"date": str(day)})
    assert again.status_code == 200  # nothing written: nothing audited
    reconciled = client.post("/v1/admin/reconciliations", headers=finance, json={"date": str(day)})
    assert reconciled.status_code == 201, reconciled.text
    rec_id = reconciled.json()["id"]
    resolved = client.post(
        f"/v1/admin/reconciliations/{rec_id}/resolution", headers=finance, json={"note": "ok"}
    )
    assert resolved.status_code == 200, resolved.text

    # sessions: an unmasked look-up
    looked = _sessions(client, admin, parked["plate"], unmasked="true", reason=REASON)
    assert looked.status_code == 200

    # gateway: a dead letter replayed (to a topic of this test alone)
    topic = f"citypark.test.roles-replay-{uuid.uuid4().hex[:8]}"
    ensure_topics(rt.settings.kafka_bootstrap, [topic])
    with factory() as db, db.begin():
        event = {
            "id": str(uuid.uuid4()),
            "source": "tests",
            "type": "citypark.parking.entry",
            "time": datetime.now(UTC).isoformat(),
            "data": {"plate": parked["plate"]},
        }
        letter = DeadLetter(
            consumer="citypark-roles-replay",
            topic=topic,
            event_id=event["id"],
            payload=json.dumps(event, ensure_ascii=False),
            error="boom",
            reason="unexpected",
        )
        db.add(letter)
        db.flush()
        letter_id = letter.id
    try:
        replayed = client.post(f"/v1/admin/dead-letters/{letter_id}/replay", headers=admin)
    finally:
        kafka_admin = KafkaAdminClient(
            bootstrap_servers=rt.settings.kafka_bootstrap, client_id="roles-tests"
        )
        kafka_admin.delete_topics([topic])
        kafka_admin.close()
    assert replayed.status_code == 200, replayed.text

    expected = {
        ("lots", "operator.create", "operator", op["id"], admin_id),
        ("lots", "lot.create", "lot", lot_id, admin_id),
        ("billing", "merchant.create", "merchant", merchant_id, admin_id),
        ("billing", "merchant.key_rotate", "merchant", merchant_id, admin_id),
        ("billing", "dispute.decide", "dispute", dispute_id, finance_id),
        ("billing", "settlement.run", "settlement", str(day), finance_id),
        ("billing", "reconciliation.run", "reconciliation", rec_id, finance_id),
        ("billing", "reconciliation.resolve", "reconciliation", rec_id, finance_id),
        ("sessions", "lookup.unmasked", "session", "/v1/admin/sessions", admin_id),
        ("gateway", "dead_letter.replay", "dead_letter", str(letter_id), admin_id),
    }

    def logged() -> list[tuple[str, str, str, str, str]]:
        rows: list[dict[str, Any]] = []
        for actor in (admin_id, finance_id):
            page = client.get(
                "/v1/admin/audit", params={"actor": actor, "limit": 200}, headers=viewer
            )
            assert page.status_code == 200, page.text
            rows += page.json()["items"]
        return sorted(
            (r["service"], r["action"], r["entity"], r["entity_id"], r["actor"]) for r in rows
        )

    group = f"citypark-lots-audit-test-{uuid.uuid4().hex[:8]}"
    _relay(rt)
    _consume(rt, group)
    assert logged() == sorted(expected)

    # Delivered again (a relay that crashed before marking its rows, a replay): still once.
    with factory() as db:
        rows = db.scalars(
            select(LogRow).where(LogRow.topic == AUDIT_EVENTS, LogRow.relayed_at.is_not(None))
        ).all()
        again_events = [(r.topic, r.key, CloudEvent.from_json(r.payload)) for r in rows]
    assert len(again_events) >= 8
    rt.bus.publish_many(again_events)
    _consume(rt, group)  # the same group gets the duplicates
    _consume(rt, f"{group}-2")  # and a new one reads everything again
    assert logged() == sorted(expected)

    # The entries say why and by which service; the filters find them.
    lookup = client.get(
        "/v1/admin/audit",
        params={"service": "sessions", "actor": admin_id, "entity": "session"},
        headers=viewer,
    ).json()["items"]
    assert [(e["action"], e["reason"]) for e in lookup] == [("lookup.unmasked", REASON)]
    assert lookup[0]["after"]["query"]["plate"] == mask_plate(parked["plate"])  # masked here
    for_admin = client.get(
        "/v1/admin/audit",
        params={"service": "sessions", "actor": admin_id, "unmasked": "true", "reason": REASON},
        headers=admin,
    ).json()["items"]
    [unmasked] = for_admin
    assert unmasked["after"]["query"]["plate"] == parked["plate"]
    now = datetime.now(UTC)
    window = {"actor": finance_id, "from": (now - timedelta(hours=1)).isoformat()}
    recent = client.get("/v1/admin/audit", params=window, headers=viewer).json()["items"]
    assert {e["action"] for e in recent} == {
        "dispute.decide",
        "settlement.run",
        "reconciliation.run",
        "reconciliation.resolve",
    }
    before = client.get(
        "/v1/admin/audit",
        params={"actor": finance_id, "to": (now - timedelta(hours=1)).isoformat()},
        headers=viewer,
    ).json()["items"]
    assert before == []
    naive = client.get("/v1/admin/audit", params={"from": "2026-01-01T00:00:00"}, headers=viewer)
    assert (naive.status_code, naive.json()["code"]) == (422, "validation_failed")


# ---------------------------------------------------------------------------------------------
# On the embedded city: the log table is the bus, and the lots worker keeps the audit log.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    db_file: Path = tmp_path_factory.mktemp("roles-embedded") / "city.db"
    with embedded_city(db_file) as tc:
        yield tc


def test_embedded_city_masks_for_viewers_and_audits_each_look_up_once(
    embedded: TestClient,
) -> None:
    rt: Runtime = embedded.app.state.runtime  # type: ignore[attr-defined]
    admin, admin_id = _headers(rt, Role.admin)
    viewer, _ = _headers(rt, Role.viewer)
    op = embedded.post(
        "/v1/admin/operators",
        headers=admin,
        json={"name": "emb", "commission_bps": 0, "settlement_account": "6222000099998888"},
    ).json()
    shown = embedded.get(f"/v1/admin/operators/{op['id']}", headers=viewer).json()
    assert shown["settlement_account"] == "****8888"

    plate = _plate()
    with rt.sessionmaker() as db, db.begin():
        db.add(
            ParkingSession(
                lot_id=str(uuid.uuid4()),
                lot_code="EMB",
                district="gusu",
                operator_id=op["id"],
                plate=plate,
                plate_color="blue",
                vehicle_type="small",
                entry_event_id=f"emb/{uuid.uuid4()}",
                entered_at=datetime.now(UTC),
            )
        )
    assert _sessions(embedded, viewer, plate).json()["code"] == "unmasked_forbidden"
    masked = embedded.get("/v1/admin/sessions", headers=viewer).json()
    assert [s["plate"] for s in masked] == [mask_plate(plate)]
    refused = _sessions(embedded, viewer, plate, unmasked="true", reason=REASON)
    assert refused.status_code == 403
    assert _sessions(embedded, admin, plate, unmasked="true").status_code == 422
    full = _sessions(embedded, admin, plate, unmasked="true", reason=REASON).json()
    assert [s["plate"] for s in full] == [plate]

    def lookups() -> list[dict[str, Any]]:
        return embedded.get(  # type: ignore[no-any-return]
            "/v1/admin/audit",
            params={"service": "sessions", "actor": admin_id},
            headers=viewer,
        ).json()["items"]

    [entry] = wait_for(lookups)
    assert (entry["action"], entry["reason"], entry["role"]) == (
        "lookup.unmasked",
        REASON,
        "admin",
    )

    # The same event on the log once more, then a fresh one behind it: once it is in, the
    # duplicate has been through the consumer too, and was kept once.
    with rt.sessionmaker() as db, db.begin():
        row = db.scalars(
            select(LogRow)
            .where(LogRow.topic == AUDIT_EVENTS, LogRow.source == "sessions")
            .order_by(LogRow.id.desc())
        ).first()
        assert row is not None
        event = CloudEvent.from_json(row.payload)
        assert event.type == EventType.admin_write
        enqueue(db, source="sessions", topic=AUDIT_EVENTS, key=row.key, event=event)
    other = "second look-up, to follow the duplicate through"
    assert _sessions(embedded, admin, plate, unmasked="true", reason=other).status_code == 200
    wait_for(lambda: any(e["reason"] == other for e in lookups()))
    assert sorted(e["reason"] for e in lookups()) == sorted([REASON, other])
