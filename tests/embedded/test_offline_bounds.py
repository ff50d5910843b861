"""What the city does not take from a car park on its word: an offline `postpay` it cannot back
(a snapshot it never served, a vehicle not eligible in it, an instant outside the car park's
outage), quotes that would tell where a plate holds a pass, and internal headers from outside.

Each offline claim here would have been honoured as stated before the bounds: the exit would
have been recorded `postpay` and charged to a suspended driver."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from citypark_connector import SignatureAuth
from sqlalchemy import select, update

from loadtests.ownership import add_verified_vehicle
from services.gateway.gate import state as gate_state
from services.gateway.models import EligibilityServed, EligibilitySet, OfflineClaim
from services.gateway.offline import service as bounds
from services.gateway.tokens import service as admin_tokens
from services.lots.schemas import EXAMPLE_TARIFF
from shared.auth import Role, internal_token
from shared.db import transaction
from shared.events import AccountUpdated, PostpayStatus, VehicleRef
from shared.timeutil import utcnow
from tests.embedded.test_offline_decisions import City, lot_event, sign_in
from tests.embedded_city import embedded_city, onboard_lot

DISTRICT = "wuzhong"
TARIFF = {
    **EXAMPLE_TARIFF,
    "free_minutes": 0,
    "rates": {
        size: {"periods": [{"start": "00:00", "end": "00:00", "unit_minutes": 60, "unit_fen": 500}]}
        for size in ("small", "large")
    },
}


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Iterator[City]:
    with embedded_city(tmp_path_factory.mktemp("bounds") / "city.db") as client:
        rt = client.app.state.runtime  # type: ignore[attr-defined]
        with transaction(rt.sessionmaker) as db:
            admin = {"Authorization": f"Bearer {admin_tokens.create(db, rt.secret, Role.admin)}"}
        lot, private_pem = onboard_lot(
            client, admin, code="BND-1", district=DISTRICT, tariff=TARIFF
        )
        gate = httpx.Client(
            base_url="http://testserver",
            transport=client._transport,
            auth=SignatureAuth("bnd-1", private_pem),
        )
        yield City(client, rt, admin, lot["id"], gate, private_pem)
        gate.close()


_serial = itertools.count(81_000)


def new_plate() -> str:
    return f"苏E{next(_serial)}"


def gate_driver(
    city: City, plate: str, postpay: PostpayStatus, driver_id: str | None = None, version: int = 1
) -> str:
    driver_id = driver_id or str(uuid.uuid4())
    vehicles = [VehicleRef(plate=plate, plate_color="blue", verified=True)]
    account = AccountUpdated(
        driver_id=driver_id, version=version, postpay=postpay, vehicles=vehicles
    )
    assert gate_state.apply_account(city.rt.redis, city.rt.settings, account)
    return driver_id


def served_now(city: City) -> int:
    answer = city.gate.get("/v1/connector/eligibility")
    assert answer.status_code == 200, answer.text
    return int(answer.json()["version"])


def seen_at(city: City, seconds_ago: float) -> float:
    """The car park's last request reached the city `seconds_ago`; no earlier outage known."""
    now = time.time()
    r = city.rt.redis
    r.delete(f"citypark:gw:lot:{city.lot_id}:gaps")
    r.set(f"citypark:gw:lot:{city.lot_id}:seen", int((now - seconds_ago) * 1000))
    return now


def replay(city: City, plate: str, **promise: Any) -> dict[str, Any]:
    body = {
        "event_id": str(uuid.uuid4()),
        "plate": plate,
        "plate_color": "blue",
        "occurred_at": (datetime.now(UTC) - timedelta(seconds=30)).isoformat(),
        "lane": "X1",
        "offline_decision": {"reason": "enrolled", **promise},
    }
    answer = city.gate.post("/v1/connector/exits", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def claim_of(city: City, event_id: str) -> OfflineClaim | None:
    with city.rt.sessionmaker() as db:
        return db.get(OfflineClaim, (city.lot_id, event_id))


def suspended_since_served(city: City) -> tuple[str, int]:
    """A car eligible in the snapshot the lot got, whose driver is suspended now."""
    car = new_plate()
    driver_id = gate_driver(city, car, PostpayStatus.active)
    version = served_now(city)
    gate_driver(city, car, PostpayStatus.suspended, driver_id, version=2)
    return car, version


def at(now: float, seconds_ago: float) -> str:
    return datetime.fromtimestamp(now - seconds_ago, UTC).isoformat()


# -- an offline postpay the city backs, and the ones it does not -----------------------------


def test_a_backed_postpay_is_honoured_and_no_claim_is_kept(city: City) -> None:
    car, version = suspended_since_served(city)
    now = seen_at(city, 6)

    answer = replay(
        city, car, decision="postpay", eligibility_version=version, decided_at=at(now, 3)
    )

    assert (answer["decision"], answer["reason"]) == ("postpay", "offline_snapshot")
    assert claim_of(city, answer["event_id"]) is None


def test_a_snapshot_never_served_backs_nothing(city: City) -> None:
    car, version = suspended_since_served(city)
    now = seen_at(city, 6)

    answer = replay(
        city, car, decision="postpay", eligibility_version=version + 1000, decided_at=at(now, 3)
    )

    assert (answer["decision"], answer["reason"]) == ("pay_on_site", "not_eligible")
    claim = claim_of(city, answer["event_id"])
    assert claim is not None
    assert (claim.reason, claim.claimed_decision, claim.decision) == (
        "snapshot_unknown",
        "postpay",
        "pay_on_site",
    )
    event = lot_event(city, answer["event_id"])
    assert (event.decision, event.reason) == ("pay_on_site", "suspended_arrears")
    # The claim keeps the plate encrypted at rest; read through the model it is the plate.
    assert claim.plate == car
    with city.rt.engine.connect() as conn:
        stored = conn.exec_driver_sql(
            "SELECT plate FROM gateway_offline_claim WHERE event_id = ?", (answer["event_id"],)
        ).scalar_one()
    assert stored.startswith("pii1.")
    assert car not in stored
    # Nor does a claim without any version.
    none = replay(city, car, decision="postpay", eligibility_version=None, decided_at=at(now, 2))
    assert none["decision"] == "pay_on_site"
    assert claim_of(city, none["event_id"]).reason == "snapshot_unknown"  # type: ignore[union-attr]


def test_a_vehicle_not_eligible_in_the_snapshot_is_not_backed(city: City) -> None:
    car = new_plate()
    gate_driver(city, car, PostpayStatus.suspended)
    version = served_now(city)  # served while suspended: not in it
    now = seen_at(city, 6)

    answer = replay(
        city, car, decision="postpay", eligibility_version=version, decided_at=at(now, 3)
    )

    assert (answer["decision"], answer["reason"]) == ("pay_on_site", "not_eligible")
    assert claim_of(city, answer["event_id"]).reason == "not_eligible_in_snapshot"  # type: ignore[union-attr]


def test_a_snapshot_replaced_before_the_decision_backs_nothing(city: City) -> None:
    car, version = suspended_since_served(city)
    served_now(city)  # the lot got a newer one since: the old one ends here
    with transaction(city.rt.sessionmaker) as db:  # ... a minute ago, say
        db.execute(
            update(EligibilityServed)
            .where(EligibilityServed.lot_id == city.lot_id, EligibilityServed.version == version)
            .values(superseded_at=utcnow() - timedelta(seconds=60))
        )
    now = seen_at(city, 6)

    answer = replay(
        city, car, decision="postpay", eligibility_version=version, decided_at=at(now, 3)
    )

    assert answer["decision"] == "pay_on_site"
    assert claim_of(city, answer["event_id"]).reason == "snapshot_superseded"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("seconds_ago", "why"),
    [
        (30, "decided before the lot's last request reached the city"),
        (-60, "decided in the future"),
    ],
)
def test_a_decision_outside_the_lots_outage_is_not_backed(
    city: City, seconds_ago: float, why: str
) -> None:
    car, version = suspended_since_served(city)
    now = seen_at(city, 0.2)  # the lot was in touch a moment ago: no outage since

    answer = replay(
        city, car, decision="postpay", eligibility_version=version, decided_at=at(now, seconds_ago)
    )

    assert answer["decision"] == "pay_on_site", why
    assert claim_of(city, answer["event_id"]).reason == "outside_outage"  # type: ignore[union-attr]


def test_an_offline_pay_on_site_where_the_city_says_postpay_is_kept_uncharged_and_recorded(
    city: City,
) -> None:
    car = new_plate()
    driver_id = gate_driver(city, car, PostpayStatus.active)
    now = seen_at(city, 6)

    answer = replay(city, car, decision="pay_on_site", eligibility_version=1, decided_at=at(now, 3))

    assert (answer["decision"], answer["reason"]) == ("pay_on_site", "offline_snapshot")
    event = lot_event(city, answer["event_id"])
    assert (event.decision, event.driver_id) == ("pay_on_site", driver_id)  # nothing to charge
    claim = claim_of(city, answer["event_id"])
    assert claim is not None
    assert (claim.reason, claim.claimed_decision, claim.decision) == (
        "city_would_postpay",
        "pay_on_site",
        "pay_on_site",
    )


def test_claims_are_listed_for_staff_with_plates_masked(city: City) -> None:
    car, version = suspended_since_served(city)
    now = seen_at(city, 6)
    answer = replay(
        city, car, decision="postpay", eligibility_version=version + 7, decided_at=at(now, 3)
    )

    listed = city.client.get(
        "/v1/admin/unbacked-claims", params={"lot_id": city.lot_id}, headers=city.admin
    )

    assert listed.status_code == 200, listed.text
    mine = next(c for c in listed.json() if c["event_id"] == answer["event_id"])
    assert (mine["reason"], mine["claimed_decision"], mine["decision"]) == (
        "snapshot_unknown",
        "postpay",
        "pay_on_site",
    )
    assert mine["plate"] != car
    assert mine["plate"][:2] == car[:2]
    assert city.client.get("/v1/admin/unbacked-claims").status_code == 401


def test_snapshots_are_kept_as_served_and_pruned_after_the_retention(city: City) -> None:
    car = new_plate()
    gate_driver(city, car, PostpayStatus.active)
    version = served_now(city)
    with city.rt.sessionmaker() as db:
        row = db.get(EligibilityServed, (city.lot_id, version))
        assert row is not None
        assert row.superseded_at is None
        stored = db.get(EligibilitySet, row.digest)
        assert stored is not None
        assert row.kdf is not None  # hashed with the lot's salt, and kept with it
        assert bytes.fromhex(bounds.vehicle_hash(row.kdf, car, "blue")) in {
            stored.hashes[i : i + 32] for i in range(0, len(stored.hashes), 32)
        }
    gate_driver(city, new_plate(), PostpayStatus.active)
    newer = served_now(city)
    assert newer > version
    with transaction(city.rt.sessionmaker) as db:
        old = db.get(EligibilityServed, (city.lot_id, version))
        assert old is not None
        assert old.superseded_at is not None
        # Kept while younger than the retention; gone after it, with plates nobody refers to.
        assert bounds.prune(db, utcnow() - timedelta(days=7)) == 0
        old.superseded_at = utcnow() - timedelta(days=8)
        db.flush()
        assert bounds.prune(db, utcnow() - timedelta(days=7)) >= 1
        kept = db.scalars(
            select(EligibilityServed.version).where(EligibilityServed.lot_id == city.lot_id)
        ).all()
        assert version not in kept
        assert newer in kept
        referenced = set(db.scalars(select(EligibilityServed.digest)))
        assert set(db.scalars(select(EligibilitySet.digest))) <= referenced


# -- quotes with a plate -------------------------------------------------------------------


def test_quotes_with_a_plate_need_the_driver_or_the_car_park(city: City) -> None:
    client = city.client
    me = sign_in(city, "13800000088")
    other = sign_in(city, "13800000089")
    mine, theirs = new_plate(), new_plate()
    add_verified_vehicle(client, me, mine)
    add_verified_vehicle(client, other, theirs)
    today = date.today()
    for plate in (mine, theirs):
        put = city.gate.put(
            f"/v1/connector/passes/q-{plate[-5:]}",
            json={
                "plate": plate,
                "plate_color": "blue",
                "kind": "whitelist",
                "valid_from": (today - timedelta(days=2)).isoformat(),
                "valid_to": (today + timedelta(days=2)).isoformat(),
            },
        )
        assert put.status_code in (200, 201), put.text
    now = datetime.now(UTC).replace(microsecond=0)
    stay = {
        "lot_id": city.lot_id,
        "entered_at": (now - timedelta(hours=3)).isoformat(),
        "exited_at": (now - timedelta(hours=1)).isoformat(),
    }

    def fee(body: dict[str, Any], **kw: Any) -> int:
        answer = client.post("/v1/quotes", json=body, **kw)
        assert answer.status_code == 200, answer.text
        return int(answer.json()["fee_fen"])

    tariff_alone = fee(stay)  # anonymous without a plate: open as before
    assert tariff_alone == 1000

    anonymous = client.post("/v1/quotes", json={**stay, "plate": mine})
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"].startswith("application/problem+json")
    assert anonymous.json()["code"] == "auth_required"

    assert fee({**stay, "plate": mine}, headers=me) == 0  # their own pass applies
    # Another driver's plate: priced as if it held no pass (never telling that it does).
    assert fee({**stay, "plate": theirs}, headers=me) == tariff_alone
    # The car park itself, signing as it does for the connector API.
    assert fee({**stay, "plate": theirs}, auth=SignatureAuth("bnd-1", city.private_pem)) == 0


# -- internal headers from outside ---------------------------------------------------------


def test_an_outside_caller_with_the_internal_token_is_not_let_in(city: City) -> None:
    token = internal_token(city.rt.secret)

    outside = city.client.get("/internal/lots/stats", headers={"x-citypark-internal": token})
    forged = city.client.get(
        "/internal/lots/stats",
        headers={"x-citypark-internal": token, "x-citypark-door": "guessed"},
    )

    assert outside.status_code == 401
    assert forged.status_code == 401
    # The city's own internal calls still pass (they carry the process's door token).
    assert city.rt.internal("lots").call("GET", "/internal/lots/stats") is not None


@pytest.mark.parametrize("pass_id", ["%2E%2E", "%2e", "a%3Fb", "a%23b"])
def test_a_pass_id_that_would_change_the_internal_url_is_refused(city: City, pass_id: str) -> None:
    answer = city.gate.delete(f"/v1/connector/passes/{pass_id}")

    assert (answer.status_code, answer.json()["code"]) == (422, "pass_id_invalid")


def test_a_snapshot_still_being_hashed_is_not_recorded_as_served(
    city: City, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.gateway.connector import eligibility

    gate_driver(city, new_plate(), PostpayStatus.active)
    complete = served_now(city)
    # No time to hash the new vehicle, in the background or in this request: a partial answer.
    monkeypatch.setattr(eligibility, "warm", lambda rt, budget_s: 0)
    gate_driver(city, new_plate(), PostpayStatus.active)
    monkeypatch.setattr(eligibility, "REQUEST_BUDGET_S", 0.0)
    monkeypatch.setattr(eligibility.build, "__defaults__", (0.0,))
    partial = city.gate.get("/v1/connector/eligibility").json()
    assert partial["complete"] is False
    assert partial["version"] > complete
    with city.rt.sessionmaker() as db:
        assert db.get(EligibilityServed, (city.lot_id, partial["version"])) is None
        kept = db.get(EligibilityServed, (city.lot_id, complete))
        assert kept is not None
        assert kept.superseded_at is None  # the gate's complete snapshot still backs claims
