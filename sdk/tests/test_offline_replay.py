"""An exit decided at the gate without the city tells the city so when it is replayed."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from citypark_connector import EventState, Outbox
from conftest import FakeCity

PLATE = "苏E12345"


def sent(city: FakeCity, event_id: str) -> dict[str, Any]:
    bodies = [body for _, body in city.received if body["event_id"] == event_id]
    assert len(bodies) == 1, bodies
    return bodies[0]


def recent(value: str) -> bool:
    at = datetime.fromisoformat(value)
    return at.utcoffset() is not None and abs((datetime.now(UTC) - at).total_seconds()) < 10


def test_a_replayed_offline_exit_carries_what_the_gate_decided(
    make_client: Any, city: FakeCity
) -> None:
    city.enroll(PLATE, "blue")
    client = make_client(eligibility_refresh_s=3600)
    snapshot = client.refresh_eligibility()
    city.down = True

    decision = client.exit(plate=PLATE, plate_color="blue", lane="X1")
    refused = client.exit(plate="苏E99999", plate_color="blue", lane="X1")

    assert (decision.decision, decision.offline) == ("postpay", True)
    assert (refused.decision, refused.reason) == ("pay_on_site", "not_eligible")
    city.down = False
    assert client.flush(timeout=5) == 0
    assert "/v1/connector/batches" in city.requests
    promised = sent(city, decision.event_id)["offline_decision"]
    assert recent(promised.pop("decided_at"))
    assert promised == {
        "decision": "postpay",
        "reason": "enrolled",
        "eligibility_version": snapshot.version,
    }
    told = sent(city, refused.event_id)["offline_decision"]
    assert (told["decision"], told["reason"], told["eligibility_version"]) == (
        "pay_on_site",
        "not_eligible",
        snapshot.version,
    )
    # What the city recorded is kept next to what the gate decided.
    stored = client.outbox.get(decision.event_id)
    assert stored is not None
    assert stored.state is EventState.delivered
    assert stored.answer is not None
    assert stored.answer["decision"] == "postpay"
    assert stored.offline_decision is not None
    assert stored.offline_decision["decision"] == "postpay"


def test_without_a_snapshot_the_version_is_null(make_client: Any, city: FakeCity) -> None:
    client = make_client(eligibility_refresh_s=3600)
    city.down = True
    decision = client.exit(plate=PLATE, plate_color="blue")
    city.down = False
    assert client.flush(timeout=5) == 0

    promised = sent(city, decision.event_id)["offline_decision"]
    assert (promised["decision"], promised["reason"], promised["eligibility_version"]) == (
        "pay_on_site",
        "offline_no_snapshot",
        None,
    )


def test_online_exits_and_entries_send_nothing_new(make_client: Any, city: FakeCity) -> None:
    city.enroll(PLATE, "blue")
    client = make_client()
    online = client.exit(plate=PLATE, plate_color="blue")
    city.down = True
    queued = client.entry(plate=PLATE, plate_color="blue", vehicle_type="small", lane="E1")
    city.down = False
    assert client.flush(timeout=5) == 0

    assert online.offline is False
    assert queued.status == "queued"
    assert "offline_decision" not in sent(city, online.event_id)
    assert "offline_decision" not in sent(city, queued.event_id)
    assert "/v1/connector/batches" in city.requests  # the entry was replayed, without it


def test_outbox_rows_of_earlier_versions_are_replayed_with_their_decision(
    city: FakeCity, make_client: Any, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.sqlite3"
    event_id = str(uuid.uuid4())
    old = Outbox(path)  # as an earlier version left it: no snapshot version, no decision time
    old.add(
        event_id,
        "exit",
        {
            "event_id": event_id,
            "occurred_at": datetime.now(UTC).isoformat(),
            "plate": PLATE,
            "plate_color": "blue",
            "lane": "X1",
        },
    )
    offline = {
        "event_id": event_id,
        "decision": "postpay",
        "reason": "enrolled",
        "session_id": None,
        "offline": True,
    }
    old.set_offline_decision(event_id, offline)
    written = old.get(event_id)
    assert written is not None
    old.close()

    client = make_client(outbox_path=path)
    remembered = client.exit(plate=PLATE, plate_color="blue", event_id=event_id)
    assert (remembered.decision, remembered.reason, remembered.offline) == (
        "postpay",
        "enrolled",
        True,
    )
    assert client.flush(timeout=5) == 0

    promised = sent(city, event_id)["offline_decision"]
    decided_at = datetime.fromisoformat(promised.pop("decided_at"))
    assert abs(decided_at.timestamp() - written.created_at) < 0.01
    assert promised == {"decision": "postpay", "reason": "enrolled", "eligibility_version": None}


def test_a_late_answer_that_breaks_an_offline_promise_is_logged(
    make_client: Any, city: FakeCity, caplog: pytest.LogCaptureFixture
) -> None:
    city.enroll(PLATE, "blue")
    client = make_client(exit_deadline=0.2, eligibility_refresh_s=3600)
    client.refresh_eligibility()
    city.eligible.clear()  # the driver lost post-pay after the snapshot
    city.delay_s = 0.6  # and the city answers only after the gate decided on its own

    def warned(event_id: str) -> bool:
        return any(
            event_id in r.getMessage() and "offline postpay" in r.getMessage()
            for r in caplog.records
        )

    with caplog.at_level(logging.WARNING, logger="citypark_connector"):
        decision = client.exit(plate=PLATE, plate_color="blue")
        deadline = time.monotonic() + 5
        while not warned(decision.event_id):  # the late answer is logged once recorded
            assert time.monotonic() < deadline, "no warning about the broken promise"
            time.sleep(0.05)

    assert (decision.decision, decision.offline) == ("postpay", True)
    stored = client.outbox.get(decision.event_id)
    assert stored is not None
    assert stored.answer is not None
    assert stored.answer["decision"] == "pay_on_site"
    assert stored.offline_decision is not None
    assert stored.offline_decision["decision"] == "postpay"
    # The first send left before the gate decided: it could not carry the promise.
    assert "offline_decision" not in sent(city, decision.event_id)


@pytest.mark.parametrize(
    "refusal",
    [
        # a city that predates the field
        {"code": "validation_failed", "detail": "offline_decision: Extra inputs are not permitted"},
        {"code": "validation_failed", "detail": "offline_decision.decided_at: Input should be"},
        {"code": "offline_decision_invalid", "detail": "decided_at is outside the window"},
    ],
)
def test_an_exit_is_not_lost_when_the_city_refuses_its_offline_decision(
    make_client: Any, city: FakeCity, caplog: pytest.LogCaptureFixture, refusal: dict[str, str]
) -> None:
    city.enroll(PLATE, "blue")
    city.offline_field_refusal = refusal
    client = make_client(eligibility_refresh_s=3600)
    client.refresh_eligibility()
    city.down = True
    decision = client.exit(plate=PLATE, plate_color="blue")
    wrong_plate = client.exit(plate="BAD", plate_color="blue")
    city.down = False

    with caplog.at_level(logging.WARNING, logger="citypark_connector"):
        assert client.flush(timeout=5) == 0

    assert "offline_decision" not in sent(city, decision.event_id)
    delivered = client.outbox.get(decision.event_id)
    assert delivered is not None
    assert delivered.state is EventState.delivered
    assert any(
        decision.event_id in r.getMessage() and "resending without" in r.getMessage()
        for r in caplog.records
    )
    # Other refusals are still verdicts on the event.
    refused = client.outbox.get(wrong_plate.event_id)
    assert refused is not None
    assert refused.state is EventState.rejected


def test_async_exits_decided_offline_record_the_snapshot_version(
    make_client: Any, city: FakeCity
) -> None:
    city.enroll(PLATE, "blue")
    client = make_client(eligibility_refresh_s=3600)
    snapshot = client.refresh_eligibility()
    city.down = True

    async def gate() -> Any:
        async with client:
            return await client.exit_async(plate=PLATE, plate_color="blue")

    decision = asyncio.run(gate())

    assert (decision.decision, decision.offline) == ("postpay", True)
    reopened = Outbox(client.outbox.path)
    try:
        stored = reopened.get(decision.event_id)
    finally:
        reopened.close()
    assert stored is not None
    assert stored.offline_decision is not None
    assert stored.offline_decision["eligibility_version"] == snapshot.version
    assert recent(stored.offline_decision["decided_at"])
