"""Eligibility snapshots a car park cannot reverse: each vehicle hashed with the car park's own
salt (scrypt), built incrementally, and refusals told as `not_eligible` only."""

from __future__ import annotations

import hashlib
import types
from typing import Any

import fakeredis
import pytest
from pydantic import SecretStr

from services.gateway.connector import eligibility
from services.gateway.connector.service import public_reason
from services.gateway.gate import state
from shared.events import AccountUpdated, Decision, PostpayStatus, VehicleRef
from shared.settings import Settings

PLATE = "苏E12345"


@pytest.fixture
def rt() -> Any:
    settings = Settings(jwt_secret=SecretStr("unit-test-secret-of-at-least-32-bytes"))
    r = fakeredis.FakeRedis(decode_responses=True)
    return types.SimpleNamespace(redis=r, settings=settings)


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The vehicles hashed, in order."""
    calls: list[str] = []
    real = eligibility.Kdf.hash

    def counting(self: eligibility.Kdf, plate: str, color: str) -> str:
        calls.append(plate)
        return real(self, plate, color)

    monkeypatch.setattr(eligibility.Kdf, "hash", counting)
    return calls


def driver(rt: Any, driver_id: str, version: int, postpay: PostpayStatus, *plates: str) -> None:
    vehicles = [VehicleRef(plate=p, plate_color="blue", verified=True) for p in plates]
    account = AccountUpdated(
        driver_id=driver_id, version=version, postpay=postpay, vehicles=vehicles
    )
    assert state.apply_account(rt.redis, rt.settings, account)


def test_the_snapshot_lists_the_vehicle_only_salted_and_per_lot(rt: Any) -> None:
    driver(rt, "d1", 1, PostpayStatus.active, PLATE, "苏E54321")
    a = eligibility.build(rt, "lot-a")
    b = eligibility.build(rt, "lot-b")

    assert (a.complete, len(a.hashes)) == (True, 2)
    assert a.kdf.hash(PLATE, "blue") in a.hashes
    # Neither the plain sha256 nor an unsalted scrypt of the enrolled plate is there.
    unsalted = hashlib.scrypt(f"{PLATE}:blue".encode(), salt=b"", n=2**14, r=8, p=1).hex()
    assert {state.plate_hash(PLATE, "blue"), unsalted}.isdisjoint(a.hashes)
    # Another car park: another salt, other hashes for the same vehicles.
    assert a.kdf.salt != b.kdf.salt
    assert set(a.hashes).isdisjoint(b.hashes)
    assert b.kdf.hash(PLATE, "blue") in b.hashes
    # Kept with the snapshot served, the parameters give the same hash back.
    assert eligibility.Kdf.parse(a.kdf.spec()) == a.kdf


def test_a_newly_eligible_vehicle_costs_one_hash_per_lot(rt: Any, hashed: list[str]) -> None:
    driver(rt, "d1", 1, PostpayStatus.active, PLATE)
    first = eligibility.build(rt, "lot-a")
    assert hashed == [PLATE]

    driver(rt, "d2", 1, PostpayStatus.active, "苏E77777")
    second = eligibility.build(rt, "lot-a")
    assert hashed == [PLATE, "苏E77777"]  # only the new one
    assert second.version > first.version
    assert set(first.hashes) < set(second.hashes)

    # Unchanged: served from the cache without hashing or even reading the city's set again.
    assert eligibility.build(rt, "lot-a") == second
    # A suspended driver leaves at once, without hashing anything.
    driver(rt, "d1", 2, PostpayStatus.suspended, PLATE)
    third = eligibility.build(rt, "lot-a")
    assert len(hashed) == 2
    assert third.hashes == [second.kdf.hash("苏E77777", "blue")]


def test_rotating_the_salt_is_a_new_version_hashed_afresh(rt: Any) -> None:
    driver(rt, "d1", 1, PostpayStatus.active, PLATE)
    before = eligibility.build(rt, "lot-a")
    eligibility.rotate_salt(rt.redis, "lot-a")
    after = eligibility.build(rt, "lot-a")
    assert after.version > before.version
    assert after.kdf.salt != before.kdf.salt
    assert after.hashes == [after.kdf.hash(PLATE, "blue")] != before.hashes


def test_out_of_budget_vehicles_are_left_out_until_the_warmer_catches_up(
    rt: Any, hashed: list[str]
) -> None:
    driver(rt, "d1", 1, PostpayStatus.active, PLATE, "苏E54321")
    partial = eligibility.build(rt, "lot-a", budget_s=0)
    # Nothing hashed in time: nothing listed (offline, the car pays on site; never the reverse).
    assert (partial.complete, partial.hashes, hashed) == (False, [], [])
    assert eligibility.warm(rt, budget_s=60) == 0
    assert len(hashed) == 2
    done = eligibility.build(rt, "lot-a", budget_s=0)
    assert (done.complete, len(done.hashes)) == (True, 2)
    assert eligibility.warm(rt, budget_s=60) == 0
    assert len(hashed) == 2  # nothing left to do


@pytest.mark.parametrize(
    ("decision", "reason", "told"),
    [
        (Decision.pay_on_site, "suspended_arrears", "not_eligible"),
        (Decision.pay_on_site, "not_enrolled", "not_eligible"),
        (Decision.pay_on_site, "vehicle_unverified", "not_eligible"),
        (Decision.pay_on_site, "no_account", "not_eligible"),
        (Decision.pay_on_site, "lot_not_postpay", "lot_not_postpay"),
        (Decision.pay_on_site, "offline_snapshot", "offline_snapshot"),
        (Decision.postpay, "enrolled", "enrolled"),
        (Decision.free, "whitelist", "whitelist"),
    ],
)
def test_a_lot_hears_not_eligible_never_why(decision: Decision, reason: str, told: str) -> None:
    assert public_reason(state.GateAnswer(decision, reason, "d1")) == told


def test_car_parks_of_a_district_share_its_salt_unless_each_has_its_own(
    rt: Any, hashed: list[str]
) -> None:
    driver(rt, "d1", 1, PostpayStatus.active, PLATE)
    by_district = rt.settings.model_copy(update={"eligibility_salt_scope": "district"})
    a = eligibility.salt_scope(by_district, "lot-a", "gusu")
    b = eligibility.salt_scope(by_district, "lot-b", "gusu")
    c = eligibility.salt_scope(by_district, "lot-c", "wuzhong")
    assert a == b != c
    first, second = eligibility.build(rt, a), eligibility.build(rt, b)
    assert first.kdf.salt == second.kdf.salt
    assert first.hashes == second.hashes
    assert len(hashed) == 1  # the second car park of the district costs no hash at all
    assert eligibility.build(rt, c).kdf.salt != first.kdf.salt

    by_lot = rt.settings.model_copy(update={"eligibility_salt_scope": "lot"})
    assert eligibility.salt_scope(by_lot, "lot-a", "gusu") == "lot-a"
    assert eligibility.salt_scope(by_lot, "lot-b", "gusu") == "lot-b"
