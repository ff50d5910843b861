"""The gate's Redis state (pure logic; an in-memory Redis stands in)."""

from __future__ import annotations

import fakeredis
import pytest
from pydantic import SecretStr

from services.gateway.gate import state
from shared.events import AccountUpdated, Decision, PostpayStatus, VehicleRef
from shared.settings import Settings

S = Settings(jwt_secret=SecretStr("unit-secret-0123456789abcdefghij"))


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
    assert state.apply_account(r, S, snapshot(1, PostpayStatus.active, "苏E12345"))
    answer = state.decide(r, S, plate="苏E12345", color="blue", postpay_enabled=True)
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
    state.apply_account(r, S, snapshot(1, postpay, "苏E12345"))
    answer = state.decide(r, S, plate="苏E12345", color="blue", postpay_enabled=lot_postpay)
    assert (answer.decision, answer.reason) == (Decision.pay_on_site, reason)


def test_unknown_vehicle_is_not_enrolled(r: fakeredis.FakeRedis) -> None:
    answer = state.decide(r, S, plate="苏E99999", color="blue", postpay_enabled=True)
    assert (answer.decision, answer.reason) == (Decision.pay_on_site, "not_enrolled")


def test_older_snapshot_arriving_late_is_ignored(r: fakeredis.FakeRedis) -> None:
    state.apply_account(r, S, snapshot(2, PostpayStatus.suspended, "苏E12345"))
    assert not state.apply_account(r, S, snapshot(1, PostpayStatus.active, "苏E12345"))
    assert (
        state.decide(r, S, plate="苏E12345", color="blue", postpay_enabled=True).reason
        == "suspended_arrears"
    )


def test_removed_vehicle_is_forgotten_and_leaves_the_eligible_set(r: fakeredis.FakeRedis) -> None:
    state.apply_account(r, S, snapshot(1, PostpayStatus.active, "苏E12345", "苏E54321"))
    v1, vehicles = state.eligibility(r)
    assert state.ref(S, "苏E54321", "blue") in vehicles
    state.apply_account(r, S, snapshot(2, PostpayStatus.active, "苏E12345"))
    v2, vehicles = state.eligibility(r)
    assert v2 > v1
    assert state.ref(S, "苏E54321", "blue") not in vehicles
    assert state.driver_of(r, S, "苏E54321", "blue") is None


def test_suspension_removes_vehicles_from_offline_eligibility(r: fakeredis.FakeRedis) -> None:
    state.apply_account(r, S, snapshot(1, PostpayStatus.active, "苏E12345"))
    state.apply_account(r, S, snapshot(2, PostpayStatus.suspended, "苏E12345"))
    assert state.eligibility(r)[1] == {}


def claim(driver: str, version: int, plate: str, *, verified: bool) -> AccountUpdated:
    return AccountUpdated(
        driver_id=driver,
        version=version,
        postpay=PostpayStatus.active,
        vehicles=[VehicleRef(plate=plate, plate_color="blue", verified=verified)],
    )


def test_an_unverified_claim_pays_on_site_and_is_told_apart(r: fakeredis.FakeRedis) -> None:
    state.apply_account(r, S, claim("d1", 1, "苏E12345", verified=False))
    answer = state.decide(r, S, plate="苏E12345", color="blue", postpay_enabled=True)
    assert (answer.decision, answer.reason, answer.driver_id) == (
        Decision.pay_on_site,
        "vehicle_unverified",
        None,
    )
    assert state.driver_of(r, S, "苏E12345", "blue") is None  # entries are nobody's
    assert state.eligibility(r)[1] == {}  # nor is it eligible offline


def test_an_event_without_the_flag_counts_as_unverified(r: fakeredis.FakeRedis) -> None:
    old = AccountUpdated.model_validate(
        {
            "driver_id": "d1",
            "version": 1,
            "postpay": "active",
            "vehicles": [{"plate": "苏E12345", "plate_color": "blue"}],
        }
    )
    state.apply_account(r, S, old)
    assert state.decide(r, S, plate="苏E12345", color="blue", postpay_enabled=True).reason == (
        "vehicle_unverified"
    )


def test_verification_and_takeover_move_the_plate(r: fakeredis.FakeRedis) -> None:
    state.apply_account(r, S, claim("a", 1, "苏E12345", verified=True))
    state.apply_account(r, S, claim("b", 1, "苏E12345", verified=False))
    # A verified holder governs; B's unproven claim changes nothing for A.
    assert state.decide(r, S, plate="苏E12345", color="blue", postpay_enabled=True).driver_id == "a"
    # B proves ownership; A's superseding snapshot may arrive before or after B's.
    state.apply_account(r, S, claim("b", 2, "苏E12345", verified=True))
    state.apply_account(
        r, S, AccountUpdated(driver_id="a", version=2, postpay=PostpayStatus.active)
    )
    answer = state.decide(r, S, plate="苏E12345", color="blue", postpay_enabled=True)
    assert (answer.decision, answer.driver_id) == (Decision.postpay, "b")
    assert not state.claimed_unverified(r, S, "苏E12345", "blue")
    # B removes it: nobody holds or claims it any more.
    state.apply_account(
        r, S, AccountUpdated(driver_id="b", version=3, postpay=PostpayStatus.active)
    )
    assert state.decide(r, S, plate="苏E12345", color="blue", postpay_enabled=True).reason == (
        "not_enrolled"
    )


def everything_in(r: fakeredis.FakeRedis) -> str:
    """Every key of the db with its members and values, as one text to search."""
    parts: list[str] = []
    for key in r.scan_iter():
        kind = r.type(key)
        parts.append(key)
        if kind == "string":
            parts.append(str(r.get(key)))
        elif kind == "set":
            parts += r.smembers(key)
        elif kind == "hash":
            for field, value in r.hgetall(key).items():
                parts += [field, value]
    return "\n".join(parts)


def test_no_key_member_or_value_names_a_plate(r: fakeredis.FakeRedis) -> None:
    state.apply_account(r, S, snapshot(1, PostpayStatus.active, "苏E12345"))
    state.apply_account(r, S, claim("d2", 1, "苏E67890", verified=False))
    state.remember_open(r, S, "lot", "苏E12345", "blue", "s1")
    text = everything_in(r)
    assert state.ref(S, "苏E12345", "blue") in text  # the pseudonym stands in for it
    for plate in ("苏E12345", "E12345", "苏E67890", "E67890"):
        assert plate not in text
    # The builder of the car parks' snapshots still gets the plate, decrypted.
    _, eligible = state.eligibility(r)
    assert [state.eligible_vehicle(S, v) for v in eligible.values()] == [("苏E12345", "blue")]
    assert state.take_open(r, S, "lot", "苏E12345", "blue") == "s1"


def test_a_driver_written_by_the_earlier_layout_is_written_anew(r: fakeredis.FakeRedis) -> None:
    # Layout 1: plates in clear, and a version as new as the next snapshot's.
    r.hset(f"{state.P}driver:d1", mapping={"version": 1, "postpay": "active"})
    r.sadd(f"{state.P}driver:d1:vehicles", "苏E12345:blue")
    r.set(f"{state.P}vehicle:苏E12345:blue", "d1")
    assert state.apply_account(r, S, snapshot(1, PostpayStatus.active, "苏E12345"))
    assert r.smembers(f"{state.P}driver:d1:vehicles") == {state.ref(S, "苏E12345", "blue")}
    assert state.decide(r, S, plate="苏E12345", color="blue", postpay_enabled=True).reason == (
        "enrolled"
    )
