"""Notifications on PostgreSQL and Kafka: made by billing's notification consumer from the real
events, each shown once however often it is delivered, muted kinds never made, SMS through the
sandbox outbox, signed webhooks retried until a local receiver (port 18700) takes them, and
webhook URLs that lead anywhere but the public internet refused at registration and at send."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from kafka.admin import KafkaAdminClient, NewTopic
from pydantic import BaseModel
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loadtests.ownership import proven_vehicle
from services.billing.charge import service as charges
from services.billing.charge.models import Charge, ChargeStatus
from services.billing.driver.models import Driver, PaymentAccount, SmsMessage
from services.billing.main import part as billing_part
from services.billing.notification import consumers as notification_consumers
from services.billing.notification import service as notifications
from services.billing.notification.models import Delivery, DeliveryStatus, Notification
from services.billing.notification.port import SIGNATURE_HEADER, sign, verify
from services.billing.notification.urlguard import RESOLVER_PROVIDER
from shared.auth import issue_driver_token
from shared.bus.consumer import idempotent
from shared.bus.kafka import KafkaBus
from shared.bus.port import Message
from shared.events import (
    AccountUpdated,
    ChargeEvent,
    CloudEvent,
    Decision,
    EventType,
    Kind,
    ParkingEvent,
    PostpayStatus,
    RefundEvent,
    SealedPlate,
    SessionClosed,
    new_event,
)
from shared.http import make_app
from shared.pii_columns import index_in
from shared.runtime import Runtime, attach
from shared.settings import Settings
from tests.conftest import Infra

pytestmark = pytest.mark.integration

RECEIVER_PORT = 18700
PLATE = "苏E12345"
MASKED = "苏E·12*45"


def _redis_15(settings: Settings) -> str:
    return settings.redis_url.rsplit("/", 1)[0] + "/15"


@pytest.fixture(scope="module")
def rt(settings: Settings) -> Runtime:
    # The local receiver is plain http on loopback, which production refuses: this module opts
    # in to exactly that one address.
    relaxed = settings.model_copy(
        update={
            "redis_url": _redis_15(settings),
            "webhook_allow_http": True,
            "webhook_allowed_networks": [ipaddress.ip_network("127.0.0.1/32")],
        }
    )
    return Runtime(relaxed, source="billing")


def _client(rt: Runtime) -> Iterator[TestClient]:
    app = make_app("billing", "")
    attach(app, rt)
    for router in billing_part.routers:
        app.include_router(router)
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def api(rt: Runtime) -> Iterator[TestClient]:
    yield from _client(rt)


@pytest.fixture(scope="module")
def strict_api(settings: Settings) -> Iterator[TestClient]:
    """Billing with the production webhook rules (no opt-in)."""
    strict = Runtime(settings.model_copy(update={"redis_url": _redis_15(settings)}), "billing")
    assert (strict.settings.webhook_allow_http, strict.settings.webhook_allowed_networks) == (
        False,
        [],
    )
    yield from _client(strict)


class Receiver:
    """A driver's webhook endpoint: records what arrives, refuses the first `fail` requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail = 0
        receiver = self

        class Handle(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                refuse = receiver.fail > 0
                receiver.fail -= 1
                self.send_response(503 if refuse else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", RECEIVER_PORT), Handle)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


# --- small typed factories -------------------------------------------------------------


def enrolled_driver(factory: sessionmaker[Session], plate: str = PLATE) -> str:
    with factory() as db, db.begin():
        driver = Driver(phone=f"136{uuid.uuid4().int % 10**8:08d}")
        db.add(driver)
        db.flush()
        db.add(
            PaymentAccount(
                driver_id=driver.id, provider="sandbox", agreement_no="AGR", masked_account="**"
            )
        )
        db.add(proven_vehicle(driver.id, plate))
        return driver.id


def a_plate() -> str:
    # a plate of this test alone (vehicles are unique city-wide)
    digits = f"{uuid.uuid4().int % 10**5:05d}"
    return f"苏E{digits}"


def charge_for(
    factory: sessionmaker[Session],
    driver_id: str,
    amount_fen: int,
    *,
    session_id: str | None = None,
    plate: str = PLATE,
) -> Charge:
    exited = datetime.now(UTC) - timedelta(minutes=5)
    with factory() as db, db.begin():
        charge = Charge(
            session_id=session_id or str(uuid.uuid4()),
            driver_id=driver_id,
            lot_id="lot-n",
            lot_code="GUSU-0007",
            operator_id="op-n",
            plate=plate,
            plate_color="blue",
            entered_at=exited - timedelta(hours=2, minutes=5),
            exited_at=exited,
            amount_fen=amount_fen,
            breakdown={"lines": []},
            status=ChargeStatus.captured,
        )
        db.add(charge)
        db.flush()
        db.expunge(charge)
        return charge


class NoLots:
    """Billing's lots client where the price is given: nothing may be asked."""

    def call(self, method: str, path: str, json: Any = None) -> Any:
        raise AssertionError(f"unexpected call to lots: {method} {path}")


def opened_charge(factory: sessionmaker[Session], closed: SessionClosed, fee_fen: int) -> Charge:
    """The charge of a closed session opened as billing's consumer opens it (the price given)."""
    price = {"fee_fen": fee_fen, "breakdown": [], "commission_bps": 0}
    with factory() as db, db.begin():
        charge = charges.open_charge(db, NoLots(), closed, price)  # type: ignore[arg-type]
        assert charge is not None
        db.expunge(charge)
        return charge


def charge_event(charge: Charge, type_: EventType, *, failure: str | None = None) -> CloudEvent:
    data = ChargeEvent(
        charge_id=charge.id,
        session_id=charge.session_id,
        driver_id=charge.driver_id,
        operator_id=charge.operator_id,
        amount_fen=charge.amount_fen,
        status="captured" if type_ == EventType.charge_captured else "declined",
        failure_code=failure,
    )
    return new_event(type_, source="billing", data=data, id_=f"{type_}-{charge.id}-0")


def deliver(rt: Runtime, *events: CloudEvent, group: str | None = None) -> None:
    """Hand events to the notification handler exactly as the consumer loop does."""
    handle = idempotent(
        rt.sessionmaker,
        group or f"tests-{uuid.uuid4().hex[:8]}",
        notification_consumers.handler(rt.settings),
    )
    for n, event in enumerate(events):
        handle(Message("t", "k", event, str(n)))


def listed(api: TestClient, rt: Runtime, driver_id: str) -> list[dict[str, Any]]:
    answer = api.get("/v1/me/notifications", headers=auth(rt, driver_id))
    assert answer.status_code == 200, answer.text
    return list(answer.json())


def auth(rt: Runtime, driver_id: str) -> dict[str, str]:
    return {"authorization": f"Bearer {issue_driver_token(rt.secret, driver_id, 600)}"}


def sms_to(factory: sessionmaker[Session], driver_id: str) -> list[str]:
    with factory() as db:
        phone = db.get(Driver, driver_id).phone  # type: ignore[union-attr]
        sent = select(SmsMessage).where(SmsMessage.phone_bidx == index_in(db, "phone", phone))
        return [m.body for m in db.scalars(sent)]


def send_due(rt: Runtime) -> None:
    notifications.process_due(rt.sessionmaker, notification_consumers.channels(rt))


def wait_for(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


# --- the tests --------------------------------------------------------------------------


def test_through_kafka_an_event_delivered_twice_shows_once(
    rt: Runtime, api: TestClient, infra: Infra
) -> None:
    plate = a_plate()
    driver = enrolled_driver(rt.sessionmaker, plate)
    charge = charge_for(rt.sessionmaker, driver, 1_250, plate=plate)
    topics = [f"citypark.test.{uuid.uuid4().hex[:10]}" for _ in range(2)]
    admin = KafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap, client_id="tests")
    admin.create_topics([NewTopic(t, num_partitions=2, replication_factor=1) for t in topics])
    bus = KafkaBus(infra.kafka_bootstrap, client_id="tests-notifications")
    stop = threading.Event()
    worker = threading.Thread(
        target=notification_consumers.consumer(
            rt, topics=topics, group=f"tests-notify-{uuid.uuid4().hex[:8]}"
        ),
        args=(stop,),
        daemon=True,
    )
    try:
        worker.start()
        captured = charge_event(charge, EventType.charge_captured)
        # at-least-once upstream: the same event twice, and once more on another topic
        bus.publish(topics[0], driver, captured)
        bus.publish(topics[0], driver, captured)
        bus.publish(topics[1], driver, captured)
        # and the same capture re-enveloped under another id: the dedupe key still holds
        bus.publish(topics[1], driver, captured.model_copy(update={"id": str(uuid.uuid4())}))
        marker = charge_event(
            charge_for(rt.sessionmaker, driver, 300, plate=plate), EventType.charge_declined
        )
        bus.publish(topics[0], driver, marker)
        wait_for(lambda: len(listed(api, rt, driver)) == 2)
        time.sleep(1.0)  # let any late duplicate through, had there been one
    finally:
        stop.set()
        worker.join(timeout=15)
        bus.close()
        admin.delete_topics(topics)
        admin.close()
    items = listed(api, rt, driver)
    assert sorted(i["kind"] for i in items) == ["charge_captured", "charge_declined"]
    captured_item = next(i for i in items if i["kind"] == "charge_captured")
    assert captured_item["amount_fen"] == 1_250
    assert captured_item["plate"] == f"{plate[:2]}·{plate[2:4]}*{plate[-2:]}"
    assert "12.50元" in captured_item["body"]
    send_due(rt)
    assert len([b for b in sms_to(rt.sessionmaker, driver) if "扣款成功" not in b]) == 1
    assert len([b for b in sms_to(rt.sessionmaker, driver) if "12.50元" in b]) == 1


def test_webhook_is_signed_retried_until_taken_and_verifiable(
    rt: Runtime, api: TestClient, receiver: Receiver
) -> None:
    driver = enrolled_driver(rt.sessionmaker, a_plate())
    url = f"http://127.0.0.1:{RECEIVER_PORT}/hooks/{driver}"
    registered = api.put("/v1/me/webhook", json={"url": url}, headers=auth(rt, driver))
    assert registered.status_code == 200, registered.text
    secret = registered.json()["secret"]
    assert api.get("/v1/me/webhook", headers=auth(rt, driver)).json()["url"] == url

    charge = charge_for(rt.sessionmaker, driver, 800)
    receiver.requests.clear()
    receiver.fail = 1
    deliver(rt, charge_event(charge, EventType.charge_captured))
    send_due(rt)  # the receiver refuses: retried later
    with rt.sessionmaker() as db:
        hook = db.scalar(
            select(Delivery).where(Delivery.channel == "webhook", Delivery.target.contains(url))
        )
        assert hook is not None
        assert (hook.status, hook.attempts) == (DeliveryStatus.pending, 1)
        assert hook.next_attempt_at > datetime.now(UTC)
    with rt.sessionmaker() as db, db.begin():
        db.execute(
            update(Delivery).where(Delivery.id == hook.id).values(next_attempt_at=datetime.now(UTC))
        )
    send_due(rt)
    with rt.sessionmaker() as db:
        done = db.get(Delivery, hook.id)
        assert done is not None
        assert (done.status, done.attempts) == (DeliveryStatus.delivered, 2)

    mine = [(h, b) for h, b in receiver.requests if json.loads(b)["data"]["ref_id"] == charge.id]
    assert len(mine) == 2
    (h1, b1), (h2, b2) = mine
    assert h1["webhook-id"] == h2["webhook-id"]  # the receiver can tell the retry
    assert verify(secret, h2[SIGNATURE_HEADER], b2)
    assert not verify(secret, h2[SIGNATURE_HEADER], b2.replace(b"800", b"900"))
    assert not verify("whsec_other", h2[SIGNATURE_HEADER], b2)
    stale = sign(secret, b2, int(time.time()) - 3600)
    assert not verify(secret, stale, b2)
    body = json.loads(b2)
    assert body["type"] == "citypark.notification.charge_captured"
    assert body["data"]["amount_fen"] == 800
    # the receiving server is someone else's: the plate as third parties see it
    assert body["data"]["plate"] == "苏E***45"
    assert "苏E***45" in body["data"]["body"]
    assert MASKED not in b2.decode()
    # shown once for all its deliveries
    [item] = listed(api, rt, driver)
    assert {d["channel"]: d["status"] for d in item["deliveries"]} == {
        "sms": "delivered",
        "webhook": "delivered",
    }

    # re-registering gives a new secret; deleting stops webhooks
    again = api.put("/v1/me/webhook", json={"url": url}, headers=auth(rt, driver)).json()
    assert again["secret"] != secret
    assert api.delete("/v1/me/webhook", headers=auth(rt, driver)).status_code == 204
    assert api.get("/v1/me/webhook", headers=auth(rt, driver)).json()["code"] == "not_found"
    bad = api.put("/v1/me/webhook", json={"url": "ftp://x"}, headers=auth(rt, driver))
    assert (bad.status_code, bad.json()["code"]) == (422, "validation_failed")


def test_muted_kinds_are_neither_listed_nor_sent(rt: Runtime, api: TestClient) -> None:
    driver = enrolled_driver(rt.sessionmaker, a_plate())
    headers = auth(rt, driver)
    put = api.put(
        "/v1/me/notifications/preferences",
        json={"muted": ["charge_captured", "entry"]},
        headers=headers,
    )
    assert put.json() == {"muted": ["charge_captured", "entry"]}
    assert api.get("/v1/me/notifications/preferences", headers=headers).json() == put.json()
    bad = api.put("/v1/me/notifications/preferences", json={"muted": ["spam"]}, headers=headers)
    assert (bad.status_code, bad.json()["code"]) == (422, "validation_failed")

    deliver(
        rt,
        charge_event(charge_for(rt.sessionmaker, driver, 500), EventType.charge_captured),
        charge_event(
            charge_for(rt.sessionmaker, driver, 700),
            EventType.charge_declined,
            failure="insufficient_funds",
        ),
    )
    send_due(rt)
    [item] = listed(api, rt, driver)
    assert item["kind"] == "charge_declined"
    assert "余额不足" in item["body"]
    assert MASKED in item["body"]
    texts = sms_to(rt.sessionmaker, driver)
    assert len(texts) == 1
    assert "扣款失败" in texts[0]
    assert not any("扣款成功" in t for t in texts)


def test_every_kind_in_chinese_with_the_plate_masked(rt: Runtime, api: TestClient) -> None:
    plate = a_plate()
    driver = enrolled_driver(rt.sessionmaker, plate)
    masked = f"{plate[:2]}·{plate[2:4]}*{plate[-2:]}"
    now = datetime.now(UTC)
    entry = ParkingEvent(
        event_id=str(uuid.uuid4()),
        kind=Kind.entry,
        lot_id="lot-n",
        lot_code="GUSU-0007",
        district="gusu",
        operator_id="op-n",
        plate=plate,
        plate_color="blue",
        occurred_at=now - timedelta(hours=2),
        received_at=now - timedelta(hours=2),
    )
    stranger = entry.model_copy(update={"event_id": str(uuid.uuid4()), "plate": "苏A00001"})
    session_id = str(uuid.uuid4())
    closed = SessionClosed(
        session_id=session_id,
        lot_id="lot-n",
        lot_code="GUSU-0007",
        district="gusu",
        operator_id="op-n",
        plate=plate,
        plate_color="blue",
        vehicle_type="small",
        entered_at=now - timedelta(hours=2),
        exited_at=now,
        decision=Decision.postpay,
        driver_id=driver,
    )
    charge = opened_charge(rt.sessionmaker, closed, 1_500)  # tells the exit, with the fee

    def ev(type_: EventType, data: BaseModel) -> CloudEvent:
        if isinstance(data, SealedPlate):  # as producers send them
            data = data.sealed(rt.settings)
        return new_event(type_, source="tests", data=data)

    def account(version: int, postpay: PostpayStatus) -> CloudEvent:
        return ev(
            EventType.account_updated,
            AccountUpdated(driver_id=driver, version=version, postpay=postpay),
        )

    exit_event = ev(EventType.session_closed, closed)
    deliver(
        rt,
        ev(EventType.parking_entry, entry),
        ev(EventType.parking_entry, stranger),  # nobody's car: nobody told
        exit_event,
        exit_event.model_copy(update={"id": str(uuid.uuid4())}),  # the exit delivered again
        account(1, PostpayStatus.active),
        account(3, PostpayStatus.suspended),
        account(2, PostpayStatus.active),  # older than what was seen: ignored
        account(4, PostpayStatus.active),
        ev(
            EventType.refund_succeeded,
            RefundEvent(
                refund_id=str(uuid.uuid4()),
                charge_id=charge.id,
                driver_id=driver,
                amount_fen=500,
                credit_invoice_number="26321000000000000042",
            ),
        ),
    )
    by_kind = {i["kind"]: i for i in listed(api, rt, driver)}
    assert sorted(by_kind) == ["entry", "exit", "refund", "restored", "suspended"]
    assert "驶入GUSU-0007" in by_kind["entry"]["body"]
    assert "停车2小时0分钟" in by_kind["exit"]["body"]
    assert "停车费15.00元" in by_kind["exit"]["body"]
    assert by_kind["exit"]["amount_fen"] == 1_500
    assert "已暂停" in by_kind["suspended"]["body"]
    assert "已恢复" in by_kind["restored"]["body"]
    assert "退款5.00元" in by_kind["refund"]["body"]
    assert "26321000000000000042" in by_kind["refund"]["body"]
    for kind in ("entry", "exit", "refund"):
        assert masked in by_kind[kind]["body"]
        assert plate not in by_kind[kind]["body"]
        assert by_kind[kind]["plate"] == masked
    # another driver sees none of it
    assert listed(api, rt, enrolled_driver(rt.sessionmaker, a_plate())) == []


def test_the_exit_is_told_when_its_charge_opens_and_nothing_waits(
    rt: Runtime, api: TestClient
) -> None:
    driver = enrolled_driver(rt.sessionmaker, a_plate())
    now = datetime.now(UTC)
    closed = SessionClosed(
        session_id=str(uuid.uuid4()),
        lot_id="lot-n",
        lot_code="GUSU-0007",
        district="gusu",
        operator_id="op-n",
        plate=PLATE,
        plate_color="blue",
        vehicle_type="small",
        entered_at=now - timedelta(minutes=30),
        exited_at=now,
        decision=Decision.postpay,
        driver_id=driver,
    )
    event = new_event(EventType.session_closed, source="tests", data=closed.sealed(rt.settings))
    group = f"tests-{uuid.uuid4().hex[:8]}"
    deliver(rt, event, group=group)  # before the charge: taken at once, nothing told yet
    assert listed(api, rt, driver) == []
    opened_charge(rt.sessionmaker, closed, 0)
    [item] = listed(api, rt, driver)
    assert "本次停车免费" in item["body"]
    deliver(rt, event.model_copy(update={"id": str(uuid.uuid4())}), group=group)
    assert len(listed(api, rt, driver)) == 1  # told once, whoever comes last
    # an exit whose charge never came (its pricing failed) is told without the fee, late
    late = closed.model_copy(update={"session_id": str(uuid.uuid4())}).sealed(rt.settings)
    old = new_event(EventType.session_closed, source="tests", data=late).model_copy(
        update={"time": now - timedelta(minutes=5)}
    )
    deliver(rt, old)
    assert any("费用计算后另行通知" in i["body"] for i in listed(api, rt, driver))


def test_the_list_needs_a_driver(api: TestClient) -> None:
    answer = api.get("/v1/me/notifications")
    assert (answer.status_code, answer.json()["code"]) == (401, "unauthorized")


def test_notifications_are_unique_per_key_in_the_database(rt: Runtime) -> None:
    driver = enrolled_driver(rt.sessionmaker, a_plate())
    with rt.sessionmaker() as db, db.begin():
        kwargs: dict[str, Any] = {
            "driver_id": driver,
            "kind": "refund",
            "key": "refund:x",
            "title": "t",
            "body": "b",
        }
        assert notifications.notify(db, **kwargs) is not None
        assert notifications.notify(db, **kwargs) is None
    with rt.sessionmaker() as db:
        rows = list(db.scalars(select(Notification).where(Notification.driver_id == driver)))
        assert len(rows) == 1


# --- webhook URLs that lead inside --------------------------------------------------------


def test_registration_refuses_internal_urls_with_a_problem(
    strict_api: TestClient, api: TestClient, rt: Runtime
) -> None:
    driver = enrolled_driver(rt.sessionmaker, a_plate())
    headers = auth(rt, driver)

    def put(client: TestClient, url: str) -> tuple[int, str, str]:
        answer = client.put("/v1/me/webhook", json={"url": url}, headers=headers)
        body = answer.json()
        return answer.status_code, body.get("code", ""), body.get("detail", "")

    for url, why in [
        ("http://127.0.0.1:8003/internal/v1/ledger", "Only https"),
        ("https://127.0.0.1:8003/internal/v1/ledger", "loopback"),
        ("https://2130706433:8003/internal", "loopback"),  # 127.0.0.1 spelled as a number
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://100.100.100.200/latest/meta-data/", "non-public"),
        ("https://10.1.2.3/", "private"),
        ("https://[::1]:8003/", "loopback"),
        ("https://[::ffff:127.0.0.1]/", "loopback"),
        ("https://localhost:8003/internal", "internal name"),
        ("https://billing:8003/internal", "internal name"),
        ("https://metadata.google.internal/", "internal name"),
        ("https://user:pw@hooks.example.com/", "user name or password"),
    ]:
        status, code, detail = put(strict_api, url)
        assert (status, code) == (422, "webhook_url_forbidden"), (url, detail)
        assert why in detail, (url, detail)
    assert strict_api.get("/v1/me/webhook", headers=headers).status_code == 404

    # The module's opt-in covers 127.0.0.1 over http and nothing else.
    for url in ("http://10.1.2.3/", "http://169.254.169.254/", "http://127.0.0.2:8003/"):
        assert put(api, url)[:2] == (422, "webhook_url_forbidden"), url
    assert api.get("/v1/me/webhook", headers=headers).status_code == 404
    # an earlier, accepted webhook survives a refused replacement
    accepted = f"http://127.0.0.1:{RECEIVER_PORT}/hooks/{driver}"
    assert put(api, accepted)[0] == 200
    assert put(api, "http://10.1.2.3/")[:2] == (422, "webhook_url_forbidden")
    assert api.get("/v1/me/webhook", headers=headers).json()["url"] == accepted


class Dns:
    """The resolver billing uses, answering from a table (names under the reserved `.example`
    top-level domain, which no real DNS answers)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    def __call__(self, host: str, port: int) -> Sequence[str]:
        if host not in self.table:
            raise OSError(f"{host}: Name or service not known")
        return self.table[host]


def test_a_name_resolving_inside_or_nowhere_is_refused_at_registration(
    strict_api: TestClient, rt: Runtime
) -> None:
    driver = enrolled_driver(rt.sessionmaker, a_plate())
    headers = auth(rt, driver)
    dns = Dns({"rebind.driver.example": ["10.0.0.5"], "mixed.driver.example": ["fd00::5"]})
    strict_rt: Runtime = strict_api.app.state.runtime  # type: ignore[attr-defined]
    strict_rt.providers[RESOLVER_PROVIDER] = dns
    try:
        for url, code, why in [
            ("https://rebind.driver.example/h", "webhook_url_forbidden", "private"),
            ("https://mixed.driver.example/h", "webhook_url_forbidden", "private"),
            ("https://gone.driver.example/h", "webhook_url_unresolvable", "does not resolve"),
        ]:
            answer = strict_api.put("/v1/me/webhook", json={"url": url}, headers=headers)
            assert (answer.status_code, answer.json()["code"]) == (422, code), answer.text
            assert why in answer.json()["detail"]
            assert "10.0.0.5" not in answer.text  # the internal address is not disclosed
    finally:
        del strict_rt.providers[RESOLVER_PROVIDER]
    assert strict_api.get("/v1/me/webhook", headers=headers).status_code == 404


def test_delivery_goes_to_the_checked_address_and_not_after_rebinding(
    rt: Runtime, api: TestClient, receiver: Receiver
) -> None:
    driver = enrolled_driver(rt.sessionmaker, a_plate())
    url = f"http://hooks.driver.example:{RECEIVER_PORT}/hooks/{driver}"
    dns = Dns({"hooks.driver.example": ["127.0.0.1"]})
    rt.providers[RESOLVER_PROVIDER] = dns
    try:
        registered = api.put("/v1/me/webhook", json={"url": url}, headers=auth(rt, driver))
        assert registered.status_code == 200, registered.text

        first = charge_for(rt.sessionmaker, driver, 100)
        deliver(rt, charge_event(first, EventType.charge_captured))
        send_due(rt)
        # The name resolves only through billing's resolver, so reaching the receiver proves
        # the request went to the address that was checked, under the URL's own name.
        got = [(h, b) for h, b in receiver.requests if json.loads(b)["data"]["ref_id"] == first.id]
        assert len(got) == 1
        assert got[0][0]["host"] == f"hooks.driver.example:{RECEIVER_PORT}"

        # DNS now points the same name at another internal address (loopback, outside the
        # opt-in, so that even a broken guard could send nowhere but this machine): the
        # attempt fails and nothing is sent.
        dns.table["hooks.driver.example"] = ["127.0.0.2"]
        second = charge_for(rt.sessionmaker, driver, 200)
        deliver(rt, charge_event(second, EventType.charge_captured))
        send_due(rt)
    finally:
        del rt.providers[RESOLVER_PROVIDER]
    assert not [b for _, b in receiver.requests if json.loads(b)["data"]["ref_id"] == second.id]
    with rt.sessionmaker() as db:
        hooks = {
            n.ref_id: d
            for d, n in db.execute(
                select(Delivery, Notification)
                .join(Notification, Notification.id == Delivery.notification_id)
                .where(Notification.driver_id == driver, Delivery.channel == "webhook")
            )
        }
    assert hooks[first.id].status == DeliveryStatus.delivered
    refused = hooks[second.id]
    assert (refused.status, refused.attempts) == (DeliveryStatus.pending, 1)
    assert refused.last_error is not None
    assert "webhook_url_forbidden" in refused.last_error
    assert "loopback" in refused.last_error
