"""Drivers' rights through the whole city, in the embedded SQLite city and on PostgreSQL with
Redis (db 7): export, deletion, log out everywhere, change of phone number."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from loadtests.ownership import add_verified_vehicle, backdate_verification
from services.billing.charge.models import Charge
from services.billing.driver.models import Driver
from services.sessions.models import ParkingSession
from shared.settings import CacheKind
from tests.conftest import Infra, scratch_database
from tests.embedded_city import embedded_city, wait_for
from tests.integration.test_vehicle_ownership import (
    City,
    _onboard,
    enter,
    gate_says,
    leave,
    new_phone,
    new_plate,
    now,
)

pytestmark = pytest.mark.integration
REDIS_DB = 7


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def city(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, infra: Infra
) -> Iterator[City]:
    if request.param == "sqlite":
        with embedded_city(tmp_path_factory.mktemp("rights") / "city.db") as client:
            yield from _onboard(client)
        return
    redis_url = infra.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    redis.Redis.from_url(redis_url).flushdb()
    with (
        scratch_database(infra) as database_url,
        embedded_city(
            Path("unused"), database_url=database_url, cache=CacheKind.redis, redis_url=redis_url
        ) as client,
    ):
        yield from _onboard(client)
    redis.Redis.from_url(redis_url).flushdb()


def codes(city: City, phone: str) -> list[str]:
    """The codes the sandbox SMS outbox holds for a phone, newest first."""
    sms = city.client.get("/v1/admin/sandbox/sms", params={"phone": phone}, headers=city.admin)
    assert sms.status_code == 200, sms.text
    return [re.search(r"\d{6}", m["body"]).group(0) for m in sms.json()]  # type: ignore[union-attr]


def sign_in(city: City, phone: str) -> dict[str, str]:
    assert city.client.post("/v1/auth/otp", json={"phone": phone}).status_code == 202
    token = city.client.post("/v1/auth/token", json={"phone": phone, "code": codes(city, phone)[0]})
    assert token.status_code == 200, token.text
    return {"Authorization": f"Bearer {token.json()['access_token']}"}


def bind(city: City, me: dict[str, str], balance_fen: int) -> str:
    agreement_no: str = city.client.post(
        "/sandbox/pay/v1/agreements", json={"holder": "h", "balance_fen": balance_fen}
    ).json()["agreement_no"]
    bound = city.client.put(
        "/v1/me/account", headers=me, json={"provider": "sandbox", "agreement_no": agreement_no}
    )
    assert bound.status_code == 200, bound.text
    return agreement_no


def my_id(city: City, me: dict[str, str]) -> str:
    answer = city.client.get("/v1/me", headers=me)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


def verified(city: City, me: dict[str, str], plate: str) -> None:
    """A vehicle proven a day ago, so that stays reported now (in the past) are the driver's."""
    vehicle = add_verified_vehicle(city.client, me, plate)
    backdate_verification(city.rt.sessionmaker, vehicle["id"], now() - timedelta(days=1))


def parked(city: City, plate: str) -> None:
    t = now()
    enter(city, plate, t - timedelta(minutes=90))
    leave(city, plate, t - timedelta(minutes=1))


def charges_of(city: City, me: dict[str, str], count: int) -> list[dict[str, Any]]:
    def settled() -> list[dict[str, Any]] | None:
        found = city.client.get("/v1/me/charges", headers=me).json()
        done = [c for c in found if c["status"] not in ("pending", "unknown")]
        return done if len(done) >= count else None

    return wait_for(settled)


def refused(answer: Any) -> str:
    assert answer.status_code == 401, answer.text
    return str(answer.json()["code"])


def test_export_holds_my_data_and_nothing_of_another(city: City) -> None:
    phone, other_phone = new_phone(), new_phone()
    me, other = sign_in(city, phone), sign_in(city, other_phone)
    bind(city, me, 100_000)
    bind(city, other, 100_000)
    plate, other_plate = new_plate(), new_plate()
    verified(city, me, plate)
    verified(city, other, other_plate)
    parked(city, plate)
    parked(city, other_plate)
    charges_of(city, me, 1)
    charges_of(city, other, 1)
    put = city.client.put("/v1/me/notifications/preferences", headers=me, json={"muted": ["entry"]})
    assert put.status_code < 300, put.text

    answer = city.client.get("/v1/me/export", headers=me)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["profile"]["phone"] == phone
    assert data["payment_account"]["masked_account"]
    assert [(v["plate"], v["status"]) for v in data["vehicles"]] == [(plate, "verified")]
    assert data["vehicles"][0]["verified_at"]
    assert [p["plate"] for p in data["parkings"]] == [plate]
    assert len(data["charges"]) == 1
    assert data["charges"][0]["plate"] == plate
    assert "agreement_no" not in data["charges"][0]
    assert data["notification_preferences"] == {"muted": ["entry"]}
    assert data["notifications"], "the exit and the capture were told"
    text = json.dumps(data, ensure_ascii=False)
    assert other_phone not in text
    assert other_plate not in text
    assert my_id(city, other) not in text


def test_delete_waits_for_open_parkings_and_arrears_then_erases(city: City) -> None:
    phone, plate = new_phone(), new_plate()
    me = sign_in(city, phone)
    agreement_no = bind(city, me, 0)  # every charge is declined: arrears
    driver_id = my_id(city, me)
    verified(city, me, plate)
    wait_for(lambda: gate_says(city, plate).reason == "enrolled")

    t = now() - timedelta(minutes=60)
    enter(city, plate, t)
    wait_for(lambda: _sessions_of(city, driver_id))
    blocked = city.client.delete("/v1/me", headers=me)
    assert blocked.status_code == 409, blocked.text
    assert blocked.json()["code"] == "account_has_open_sessions"

    leave(city, plate, now())
    assert charges_of(city, me, 1)[0]["status"] == "declined"
    blocked = city.client.delete("/v1/me", headers=me)
    assert blocked.status_code == 409, blocked.text
    assert blocked.json()["code"] == "account_has_arrears"

    funded = city.client.post(  # money on the account, and the arrears paid from it
        f"/sandbox/pay/v1/agreements/{agreement_no}/deposits", json={"amount_fen": 100_000}
    )
    assert funded.status_code < 300, funded.text
    paid = city.client.post("/v1/me/arrears/payments", headers=me)
    assert paid.status_code == 202, paid.text
    wait_for(
        lambda: (
            {c["status"] for c in city.client.get("/v1/me/charges", headers=me).json()}
            == {"captured"}
        ),
        timeout_s=10,
    )

    done = city.client.delete("/v1/me", headers=me)
    assert done.status_code == 204, done.text

    # Every token of the driver is refused, in billing and in sessions.
    assert refused(city.client.get("/v1/me", headers=me)) == "token_revoked"
    assert refused(city.client.get("/v1/me/sessions", headers=me)) == "token_revoked"
    # The gate forgets the vehicle.
    wait_for(lambda: gate_says(city, plate).reason == "not_enrolled")
    # Parkings keep no driver link and no plate in clear.
    with city.rt.sessionmaker() as db:
        assert _sessions_of(city, driver_id) == []
        mine = db.scalar(select(ParkingSession).where(ParkingSession.entered_at == t))
        assert mine is not None
        assert mine.driver_id is None
        assert mine.plate.startswith("v_")
        assert mine.plate != plate
        assert mine.pseudonymised_at is not None
        # Money stays, anonymised: the charge under the driver's id, without the plate.
        charge = db.scalar(select(Charge).where(Charge.driver_id == driver_id))
        assert charge is not None
        assert charge.plate != plate
        assert charge.agreement_no is None
        erased = db.get(Driver, driver_id)
        assert erased is not None
        assert erased.erased_at is not None
        assert phone not in erased.phone
    ledger = city.client.get("/v1/admin/ledger/check", headers=city.admin)
    assert ledger.status_code == 200, ledger.text
    assert ledger.json()["balanced"] is True, ledger.text

    # The phone signs in as a new driver, with nothing of the old one.
    again = sign_in(city, phone)
    assert my_id(city, again) != driver_id
    assert city.client.get("/v1/me/vehicles", headers=again).json() == []
    assert city.client.get("/v1/me/charges", headers=again).json() == []


def _sessions_of(city: City, driver_id: str) -> list[str]:
    with city.rt.sessionmaker() as db:
        return list(
            db.scalars(select(ParkingSession.id).where(ParkingSession.driver_id == driver_id))
        )


def test_logout_all_refuses_every_old_token(city: City) -> None:
    phone = new_phone()
    first, second = sign_in(city, phone), sign_in(city, phone)
    assert city.client.get("/v1/me/sessions", headers=second).status_code == 200
    assert city.client.post("/v1/me/logout-all", headers=first).status_code == 204
    for old in (first, second):
        assert refused(city.client.get("/v1/me", headers=old)) == "token_revoked"
        assert refused(city.client.get("/v1/me/sessions", headers=old)) == "token_revoked"
    fresh = sign_in(city, phone)  # the same second as the cut-off still works
    assert city.client.get("/v1/me", headers=fresh).status_code == 200
    assert city.client.get("/v1/me/sessions", headers=fresh).status_code == 200


def test_a_revoked_token_is_refused_by_a_service_that_asks_billing() -> None:
    """Another process learns a cut-off on its next refresh (at most `max_age_s` later)."""
    from shared.auth import DriverCutoffs

    clock = [0.0]
    served: dict[str, int] = {}
    cutoffs = DriverCutoffs(lambda: dict(served), max_age_s=5.0, clock=lambda: clock[0])
    assert cutoffs.cutoff("d1") is None
    served["d1"] = int(time.time() * 1000)
    clock[0] = 4.9
    assert cutoffs.cutoff("d1") is None  # not yet asked again
    clock[0] = 5.0
    assert cutoffs.cutoff("d1") == served["d1"]


def test_change_of_phone_needs_both_codes(city: City) -> None:
    old, new, taken = new_phone(), new_phone(), new_phone()
    me = sign_in(city, old)
    sign_in(city, taken)
    clash = city.client.post("/v1/me/phone", headers=me, json={"phone": taken})
    assert clash.status_code == 409, clash.text
    assert clash.json()["code"] == "phone_taken"

    asked = city.client.post("/v1/me/phone", headers=me, json={"phone": new})
    assert asked.status_code == 202, asked.text
    code_old, code_new = codes(city, old)[0], codes(city, new)[0]
    wrong = "000000" if code_new != "000000" else "111111"
    bad = city.client.post(
        "/v1/me/phone/confirm",
        headers=me,
        json={"phone": new, "code_old": code_old, "code_new": wrong},
    )
    assert bad.status_code == 401, bad.text
    assert bad.json()["code"] == "otp_invalid"
    swapped = city.client.post(  # each code only for its own number
        "/v1/me/phone/confirm",
        headers=me,
        json={"phone": new, "code_old": code_new, "code_new": code_old},
    )
    assert swapped.status_code == 401, swapped.text
    # A phone-change code does not sign anyone in.
    signin = city.client.post("/v1/auth/token", json={"phone": new, "code": code_new})
    assert signin.status_code == 401, signin.text
    done = city.client.post(
        "/v1/me/phone/confirm",
        headers=me,
        json={"phone": new, "code_old": code_old, "code_new": code_new},
    )
    assert done.status_code == 200, done.text
    assert done.json()["phone"] == city.client.get("/v1/me", headers=me).json()["phone"]
    assert my_id(city, sign_in(city, new)) == my_id(city, me)
    fresh_old = sign_in(city, old)  # the old number is free: a new driver
    assert my_id(city, fresh_old) != my_id(city, me)
