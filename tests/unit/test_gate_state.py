"""The gate's Redis state (pure logic; an in-memory Redis stands in)."""

from __future__ import annotations

import fakeredis
import pytest

from services.gateway.gate import state
from shared.events import AccountUpdated, Decision, PostpayStatus, VehicleRef


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(decode_responses=True)


def snapshot(version: int, postpay: PostpayStatus, *plates: str) -> AccountUpdated:
    return AccountUpdated(
        driver_id="d1",
        version=version,
        postpay=postpay,
        vehicles=[VehicleRef(plate=p, plate_color="blue", verified=True) for p in plates],
    )


def test_active_driver_may_leave_on_postpay(r: fakeredis.FakeRedis) -> None:
    assert state.apply_account(r, snapshot(1, PostpayStatus.active, "苏E12345"))
    answer = state.decide(r, plate="苏E12345", color="blue", postpay_enabled=True)
    assert (answer.decision, answer.reason, answer.driver_id) == (
        Decision.postpay,
        "enrolled",
        "d1",
    )


@pytest.mark.parametrize(
    ("postpay", "lot_postpay", "reason"),
    [
        (PostpayStatus.suspended, True, "suspended_arrears"),
        (PostpayStatus.no_account, True, "no_account"),
        (PostpayStatus.active, False, "lot_not_postpay"),
    ],
)
def test_pay_on_site_reasons(
    r: fakeredis.FakeRedis, postpay: PostpayStatus, lot_postpay: bool, reason: str
) -> None:
    state.apply_account(r, snapshot(1, postpay, "苏E12345"))
    answer = state.decide(r, plate="苏E12345", color="blue", postpay_enabled=lot_postpay)
    assert (answer.decision, answer.reason) == (Decision.pay_on_site, reason)


def test_unknown_vehicle_is_not_enrolled(r: fakeredis.FakeRedis) -> None:
    answer = state.decide(r, plate="苏E99999", color="blue", postpay_enabled=True)
    assert (answer.decision, answer.reason) == (Decision.pay_on_site, "not_enrolled")


def test_older_snapshot_arriving_late_is_ignored(r: fakeredis.FakeRedis) -> None:
    state.apply_account(r, snapshot(2, PostpayStatus.suspended, "苏E12345"))
    assert not state.apply_account(r, snapshot(1, PostpayStatus.active, "苏E12345"))
    assert (
        state.decide(r, plate="苏E12345", color="blue", postpay_enabled=True).reason
        == "suspended_arrears"
    )


def test_removed_vehicle_is_forgotten_and_leaves_the_eligible_set(r: fakeredis.FakeRedis) -> None:
    state.apply_account(r, snapshot(1, PostpayStatus.active, "苏E12345", "苏E54321"))
    v1, vehicles = state.eligibility(r)
    assert state.vehicle_key("苏E54321", "blue") in vehicles
    state.apply_account(r, snapshot(2, PostpayStatus.active, "苏E12345"))
    v2, vehicles = state.eligibility(r)
    assert v2 > v1
    assert state.vehicle_key("苏E54321", "blue") not in vehicles
    assert state.driver_of(r, "苏E54321", "blue") is None


def test_suspension_removes_vehicles_from_offline_eligibility(r: fakeredis.FakeRedis) -> None:
    state.apply_account(r, snapshot(1, PostpayStatus.active, "苏E12345"))
    state.apply_account(r, snapshot(2, PostpayStatus.suspended, "苏E12345"))
    assert state.eligibility(r)[1] == []


def claim(driver: str, version: int, plate: str, *, verified: bool) -> AccountUpdated:
    return AccountUpdated(
        driver_id=driver,
        version=version,
        postpay=PostpayStatus.active,
        vehicles=[VehicleRef(plate=plate, plate_color="blue", verified=verified)],
    )


def test_an_unverified_claim_pays_on_site_and_is_told_apart(r: fakeredis.FakeRedis) -> None:
    state.apply_account(r, claim("d1", 1, "苏E12345", verified=False))
    answer = state.decide(r, plate="苏E12345", color="blue", postpay_enabled=True)
    assert (answer.decision, answer.reason, answer.driver_id) == (
        Decision.pay_on_site,
        "vehicle_unverified",
        None,
    )
    assert state.driver_of(r, "苏E12345", "blue") is None  # entries are nobody's
    assert state.eligibility(r)[1] == []  # nor is it eligible offline


def test_an_event_without_the_flag_counts_as_unverified(r: fakeredis.FakeRedis) -> None:
    old = AccountUpdated.model_validate(
        {
            "driver_id": "d1",
            "version": 1,
            "postpay": "active",
            "vehicles": [{"plate": "苏E12345", "plate_color": "blue"}],
        }
    )
    state.apply_account(r, old)
    assert state.decide(r, plate="苏E12345", color="blue", postpay_enabled=True).reason == (
        "vehicle_unverified"
    )


def test_verification_and_takeover_move_the_plate(r: fakeredis.FakeRedis) -> None:
    state.apply_account(r, claim("a", 1, "苏E12345", verified=True))
    state.apply_account(r, claim("b", 1, "苏E12345", verified=False))
    # A verified holder governs; B's unproven claim changes nothing for A.
    assert state.decide(r, plate="苏E12345", color="blue", postpay_enabled=True).driver_id == "a"
    # B proves ownership; A's superseding snapshot may arrive before or after B's.
    state.apply_account(r, claim("b", 2, "苏E12345", verified=True))
    state.apply_account(r, AccountUpdated(driver_id="a", version=2, postpay=PostpayStatus.active))
    answer = state.decide(r, plate="苏E12345", color="blue", postpay_enabled=True)
    assert (answer.decision, answer.driver_id) == (Decision.postpay, "b")
    assert not state.claimed_unverified(r, "苏E12345", "blue")
    # B removes it: nobody holds or claims it any more.
    state.apply_account(r, AccountUpdated(driver_id="b", version=3, postpay=PostpayStatus.active))
    assert state.decide(r, plate="苏E12345", color="blue", postpay_enabled=True).reason == (
        "not_enrolled"
    )
