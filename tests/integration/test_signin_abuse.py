"""Driver sign-in under abuse, in both topologies, with sandbox mode off (production):

* PostgreSQL: billing served on its own behind the gateway's proxy, limits counted in Redis
  (db 12); each caller connects from an address of its own on loopback (127.0.0.x), so the
  address billing sees is the one the gateway forwarded.
* SQLite: the embedded city (tests/embedded_city.py), limits in the in-process cache; each
  caller is a test client with an address of its own.

The SMS port is a recorder plugged in as `app.state.sms_port`: it is where a real SMS gateway
would take the code, and the only place a test learns it.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from services import city
from services.billing.driver.models import OtpChallenge, SmsMessage
from shared.auth import Role, issue_admin_token
from shared.pii_columns import index_in
from shared.runtime import Runtime
from shared.settings import CacheKind, Settings
from tests.embedded_city import embedded_city

REDIS_DB = 12


class Caller(Protocol):
    def get(self, url: str, **kwargs: Any) -> httpx.Response: ...
    def post(self, url: str, **kwargs: Any) -> httpx.Response: ...


@dataclass
class Recorder:
    """The SMS port: keeps what it was asked to send, in memory only."""

    sent: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, db: Session, phone: str, text: str) -> None:
        with self.lock:
            self.sent.setdefault(phone, []).append(text)

    def code_for(self, phone: str) -> str:
        with self.lock:
            return re.search(r"\d{6}", self.sent[phone][-1]).group(0)  # type: ignore[union-attr]


@dataclass
class City:
    rt: Runtime
    billing: FastAPI  # where the SMS port is plugged in
    sms: Recorder
    caller: Callable[[str], Caller]  # a client calling from this address
    # A client that reaches billing without the gateway (the same app in the embedded city).
    direct: Caller

    def limits(self, *, ip: int = 1_000_000, everyone: int = 1_000_000, window_s: int = 60) -> None:
        """Set the sign-in limits and forget every count so far."""
        s = self.rt.settings
        s.signin_ip_limit, s.signin_global_limit, s.signin_window_s = ip, everyone, window_s
        for key in self.rt.redis.scan_iter("citypark:signin:*"):
            self.rt.redis.delete(key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _served(app: FastAPI, port: int) -> Iterator[str]:
    # As `citypark run` serves: the peer is the socket's, never rewritten from a header.
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", proxy_headers=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def _real_topology(base: Settings) -> Iterator[City]:
    billing_port = _free_port()
    settings = base.model_copy(
        update={
            "redis_url": base.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}",
            "cache": CacheKind.redis,
            "sandbox_mode": False,
            "billing_url": f"http://127.0.0.1:{billing_port}",
        }
    )
    rt = Runtime(settings, source="billing")
    billing = city.build_app(rt, [city.PARTS["billing"]], workers=[])
    gateway = city.build_app(Runtime(settings, source="gateway"), [], workers=[], forward=True)
    sms = Recorder()
    billing.state.sms_port = sms
    clients: list[httpx.Client] = []

    def caller(address: str, base_url: str) -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=address)
        client = httpx.Client(base_url=base_url, transport=transport, timeout=30)
        clients.append(client)
        return client

    with _served(billing, billing_port) as billing_url, _served(gateway, _free_port()) as gw:
        try:
            yield City(
                rt,
                billing,
                sms,
                lambda address: caller(address, gw),
                caller("127.0.0.1", billing_url),
            )
        finally:
            for client in clients:
                client.close()
            for key in rt.redis.scan_iter("citypark:signin:*"):
                rt.redis.delete(key)


@contextmanager
def _embedded(db_file: Path) -> Iterator[City]:
    # A secret of its own: the in-process cache is shared by every embedded city of the run.
    secret = f"signin-abuse-{uuid.uuid4().hex}"
    with embedded_city(db_file, sandbox_mode=False, jwt_secret=secret) as tc:
        app: FastAPI = tc.app  # type: ignore[assignment]
        sms = Recorder()
        app.state.sms_port = sms

        def caller(address: str) -> TestClient:
            return TestClient(app, client=(address, 50000))

        yield City(app.state.runtime, app, sms, caller, tc)


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def town(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[City]:
    if request.param == "postgresql":
        base: Settings = request.getfixturevalue("settings")
        with _real_topology(base) as c:
            yield c
    else:
        with _embedded(tmp_path_factory.mktemp("signin") / "city.db") as c:
            yield c


@pytest.fixture
def phone() -> str:
    return f"139{uuid.uuid4().int % 10**8:08d}"


def problem_code(answer: httpx.Response) -> str:
    return str(answer.json().get("code"))


def test_fifty_parallel_wrong_guesses_get_at_most_five_comparisons(town: City, phone: str) -> None:
    town.limits()
    me = town.caller("127.0.0.21")
    assert me.post("/v1/auth/otp", json={"phone": phone}).status_code == 202
    code = town.sms.code_for(phone)
    wrong = f"{(int(code) + 1) % 10**6:06d}"

    def guess(_: int) -> httpx.Response:
        return me.post("/v1/auth/token", json={"phone": phone, "code": wrong})

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(guess, range(50)))
    codes = [problem_code(a) for a in answers]
    max_attempts = town.rt.settings.otp_max_attempts
    assert codes.count("otp_invalid") <= max_attempts, codes
    assert set(codes) <= {"otp_invalid", "otp_attempts_exceeded", "city_busy"}, codes
    # Every guess that was answered at all was counted: the code is used up.
    assert codes.count("otp_invalid") + codes.count("otp_attempts_exceeded") > max_attempts
    with Session(town.rt.engine) as db:
        by_phone = OtpChallenge.phone_bidx == index_in(db, "phone", phone)
        attempts = db.scalar(select(OtpChallenge.attempts).where(by_phone))
    assert attempts == max_attempts
    # Even the right code is refused now: it had its guesses.
    right = me.post("/v1/auth/token", json={"phone": phone, "code": code})
    assert (right.status_code, problem_code(right)) == (429, "otp_attempts_exceeded")


def test_one_address_gets_429_with_retry_after_past_its_limit(town: City, phone: str) -> None:
    town.limits(ip=4, window_s=60)
    noisy, other = town.caller("127.0.0.31"), town.caller("127.0.0.32")
    assert noisy.post("/v1/auth/otp", json={"phone": phone}).status_code == 202
    for _ in range(3):  # both endpoints count
        refused = noisy.post("/v1/auth/token", json={"phone": phone, "code": "000000"})
        assert refused.status_code != 429, refused.text
    for path, body in (
        ("/v1/auth/token", {"phone": phone, "code": "000000"}),
        ("/v1/auth/otp", {"phone": phone}),
    ):
        limited = noisy.post(path, json=body)
        assert limited.status_code == 429, limited.text
        assert problem_code(limited) == "signin_rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert limited.json()["retry_after_s"] == int(limited.headers["Retry-After"])
    # Another address is not affected.
    assert other.post("/v1/auth/otp", json={"phone": phone}).status_code == 202


def test_the_city_wide_limit_holds_across_addresses(town: City, phone: str) -> None:
    town.limits(ip=100, everyone=5, window_s=60)
    for n in range(5):
        answer = town.caller(f"127.0.0.{41 + n}").post("/v1/auth/otp", json={"phone": "12"})
        assert (answer.status_code, problem_code(answer)) == (422, "phone_invalid")
    limited = town.caller("127.0.0.47").post("/v1/auth/otp", json={"phone": phone})
    assert (limited.status_code, problem_code(limited)) == (429, "signin_rate_limited")
    assert 1 <= int(limited.headers["Retry-After"]) <= 60


def test_a_made_up_forwarded_for_is_not_trusted(town: City) -> None:
    town.limits(ip=3, window_s=60)
    liar = town.caller("127.0.0.51")
    forged = {"x-citypark-forwarded": "0" * 64}
    for n in range(3):
        headers = {"x-forwarded-for": f"203.0.113.{n}", **forged}
        assert liar.post("/v1/auth/otp", json={"phone": "12"}, headers=headers).status_code == 422
    headers = {"x-forwarded-for": "203.0.113.99", **forged}
    answer = liar.post("/v1/auth/otp", json={"phone": "12"}, headers=headers)
    assert (answer.status_code, problem_code(answer)) == (429, "signin_rate_limited")
    # Straight to billing, past the gateway: the header is the caller's word, not the gateway's.
    town.limits(ip=3, window_s=60)
    for n in range(3):
        headers = {"x-forwarded-for": f"198.51.100.{n}", **forged}
        town.direct.post("/v1/auth/otp", json={"phone": "12"}, headers=headers)
    answer = town.direct.post(
        "/v1/auth/otp", json={"phone": "12"}, headers={"x-forwarded-for": "198.51.100.9"}
    )
    assert (answer.status_code, problem_code(answer)) == (429, "signin_rate_limited")


def test_the_owner_signs_in_from_their_address_while_an_attacker_hammers_the_phone(
    town: City, phone: str
) -> None:
    town.limits(ip=100)
    owner, attacker = town.caller("127.0.0.61"), town.caller("127.0.0.62")
    assert owner.post("/v1/auth/otp", json={"phone": phone}).status_code == 202
    owners_code = town.sms.code_for(phone)
    # The attacker asks for codes until refused, and guesses until locked out.
    asked = [attacker.post("/v1/auth/otp", json={"phone": phone}) for _ in range(7)]
    assert [a.status_code for a in asked] == [202] * 5 + [429] * 2
    assert problem_code(asked[-1]) == "otp_rate_limited"
    assert int(asked[-1].headers["Retry-After"]) >= 1
    guesses = [
        problem_code(attacker.post("/v1/auth/token", json={"phone": phone, "code": f"{n:06d}"}))
        for n in range(8)
    ]
    assert guesses == ["otp_invalid"] * 5 + ["otp_attempts_exceeded"] * 3
    # None of it touched the owner's code, nor their right to a new one.
    signed_in = owner.post("/v1/auth/token", json={"phone": phone, "code": owners_code})
    assert signed_in.status_code == 200, signed_in.text
    assert owner.post("/v1/auth/otp", json={"phone": phone}).status_code == 202
    again = owner.post("/v1/auth/token", json={"phone": phone, "code": town.sms.code_for(phone)})
    assert again.status_code == 200, again.text
    # A code works only from the address that asked for it, even when it is known.
    assert owner.post("/v1/auth/otp", json={"phone": phone}).status_code == 202
    thief = town.caller("127.0.0.63")
    stolen = thief.post("/v1/auth/token", json={"phone": phone, "code": town.sms.code_for(phone)})
    assert (stolen.status_code, problem_code(stolen)) == (401, "otp_invalid")


def test_with_sandbox_off_no_code_and_no_sms_text_is_stored(town: City, phone: str) -> None:
    town.limits()
    me = town.caller("127.0.0.71")
    assert me.post("/v1/auth/otp", json={"phone": phone}).status_code == 202
    code = town.sms.code_for(phone)
    with Session(town.rt.engine) as db:
        bidx = index_in(db, "phone", phone)
        assert db.scalars(select(SmsMessage).where(SmsMessage.phone_bidx == bidx)).all() == []
        [challenge] = db.scalars(select(OtpChallenge).where(OtpChallenge.phone_bidx == bidx)).all()
        kept = [str(getattr(challenge, c.key)) for c in OtpChallenge.__table__.columns]
    assert not any(code in value for value in kept), kept
    assert re.fullmatch(r"[0-9a-f]{64}", challenge.code_hash)
    assert me.post("/v1/auth/token", json={"phone": phone, "code": code}).status_code == 200

    # With no SMS gateway plugged in, no code is made at all (rather than one sent nowhere).
    town.billing.state.sms_port = None
    try:
        other = f"138{phone[3:]}"
        answer = me.post("/v1/auth/otp", json={"phone": other})
        assert (answer.status_code, problem_code(answer)) == (503, "sms_unavailable")
        with Session(town.rt.engine) as db:
            other_bidx = OtpChallenge.phone_bidx == index_in(db, "phone", other)
            assert db.scalar(select(OtpChallenge.id).where(other_bidx)) is None
    finally:
        town.billing.state.sms_port = town.sms


def test_the_sandbox_sms_outbox_is_404_with_sandbox_off(town: City, phone: str) -> None:
    town.limits()
    me = town.caller("127.0.0.81")
    admin = {"Authorization": f"Bearer {issue_admin_token(town.rt.secret, Role.admin)[0]}"}
    assert me.post("/v1/auth/otp", json={"phone": phone}).status_code == 202
    for headers in ({}, admin):
        answer = me.get("/v1/admin/sandbox/sms", params={"phone": phone}, headers=headers)
        assert (answer.status_code, problem_code(answer)) == (404, "not_found"), answer.text

    # Sandbox mode on (development): the outbox is there for admins, the code in it.
    town.rt.settings.sandbox_mode = True
    town.billing.state.sms_port = None
    try:
        assert me.post("/v1/auth/otp", json={"phone": phone}).status_code == 202
        answer = me.get("/v1/admin/sandbox/sms", params={"phone": phone}, headers=admin)
        assert answer.status_code == 200, answer.text
        [message] = answer.json()
        code = re.search(r"\d{6}", message["body"]).group(0)  # type: ignore[union-attr]
        assert me.post("/v1/auth/token", json={"phone": phone, "code": code}).status_code == 200
    finally:
        town.rt.settings.sandbox_mode = False
        town.billing.state.sms_port = town.sms
