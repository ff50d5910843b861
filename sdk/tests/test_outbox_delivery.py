"""The connector never loses an event: outbox first, retries, ordered replay, quarantine."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from citypark_connector import EventRejected, EventState, Outbox, plate_hash
from citypark_connector._cli import app
from conftest import INVALID_PLATE, FakeCity
from typer.testing import CliRunner

PLATE = "苏E12345"


def test_entry_is_sent_at_once_when_the_city_answers(make_client: Any, city: FakeCity) -> None:
    client = make_client()

    result = client.entry(plate=PLATE, plate_color="blue", lane="E1")

    assert result.status == "accepted"
    assert city.delivered_ids() == [result.event_id]
    assert client.outbox.get(result.event_id).state is EventState.delivered
    assert client.pending() == 0


def test_entry_while_the_city_is_down_is_kept_and_delivered_later(
    make_client: Any, city: FakeCity
) -> None:
    client = make_client()
    city.down = True

    result = client.entry(plate=PLATE, plate_color="blue", lane="E1")

    assert result.status == "queued"
    assert client.pending() == 1
    assert city.delivered_ids() == []
    city.down = False
    assert client.flush(timeout=5) == 0
    assert city.delivered_ids() == [result.event_id]


def test_backlog_is_replayed_in_order_through_batches(make_client: Any, city: FakeCity) -> None:
    client = make_client()
    city.down = True
    base = datetime.now(UTC) - timedelta(hours=1)
    ids = []
    for i in range(7):
        if i % 2:
            ids.append(client.exit(plate=PLATE, plate_color="blue", occurred_at=base).event_id)
        else:
            ids.append(client.entry(plate=PLATE, plate_color="blue", occurred_at=base).event_id)
        base += timedelta(minutes=3)

    city.down = False
    assert client.flush(timeout=5) == 0

    assert city.delivered_ids() == ids
    assert "/v1/connector/batches" in city.requests
    assert [k for k, _ in city.received] == ["entry", "exit"] * 3 + ["entry"]


def test_a_new_entry_queues_behind_an_older_backlog(make_client: Any, city: FakeCity) -> None:
    client = make_client(eligibility_refresh_s=3600)
    city.down = True
    first = client.entry(plate=PLATE, plate_color="blue")
    city.down = False
    time.sleep(0.25)  # past the backoff (cap 0.2 s): the next entry may try at once

    second = client.entry(plate="苏E54321", plate_color="blue")

    client.flush(timeout=5)
    assert second.status in {"queued", "accepted"}
    assert city.delivered_ids() == [first.event_id, second.event_id]


def test_a_permanent_rejection_is_quarantined_with_its_problem(
    make_client: Any, city: FakeCity, tmp_path: Path
) -> None:
    client = make_client()

    with pytest.raises(EventRejected) as caught:
        client.entry(plate=INVALID_PLATE, plate_color="blue")

    assert (caught.value.http_status, caught.value.code) == (422, "plate_invalid")
    [stored] = client.outbox.list(EventState.rejected)
    assert stored.answer is not None
    assert stored.answer["code"] == "plate_invalid"
    assert client.flush(timeout=1) == 0  # never sent again

    # The same event again answers from the outbox, without a round trip (the background
    # refresh of the eligibility snapshot may come and go meanwhile: it is not counted).
    def sent() -> int:
        return sum(path != "/v1/connector/eligibility" for path in city.requests)

    before = sent()
    with pytest.raises(EventRejected):
        client.entry(plate=INVALID_PLATE, plate_color="blue", event_id=stored.event_id)
    assert sent() == before


def test_a_rejection_inside_a_replayed_batch_does_not_hold_up_the_rest(
    make_client: Any, city: FakeCity
) -> None:
    client = make_client()
    city.down = True
    good1 = client.entry(plate=PLATE, plate_color="blue").event_id
    bad = client.entry(plate=INVALID_PLATE, plate_color="blue").event_id
    good2 = client.entry(plate="苏E54321", plate_color="blue").event_id
    city.down = False

    assert client.flush(timeout=5) == 0

    assert city.delivered_ids() == [good1, good2]
    assert client.outbox.get(bad).state is EventState.rejected
    assert client.outbox.get(bad).answer["code"] == "plate_invalid"


def test_an_answer_lost_on_the_way_back_is_not_a_duplicate(
    make_client: Any, city: FakeCity
) -> None:
    client = make_client()
    city.lose_answers = 1  # the city commits the entry, the connection drops before the answer

    result = client.entry(plate=PLATE, plate_color="blue")

    assert result.status == "queued"
    assert client.flush(timeout=5) == 0
    assert city.delivered_ids() == [result.event_id]  # once, though it was sent twice
    assert client.outbox.get(result.event_id).answer["status"] == "duplicate"


def test_429_waits_at_least_retry_after(make_client: Any, city: FakeCity) -> None:
    client = make_client(eligibility_refresh_s=3600)
    city.rate_limited, city.retry_after_s = 1, 1
    client.start()
    time.sleep(0.1)  # the worker's first eligibility refresh uses up the 429
    city.rate_limited = 1
    started = time.monotonic()

    result = client.entry(plate=PLATE, plate_color="blue")

    assert result.status == "queued"
    assert client.flush(timeout=5) == 0
    assert time.monotonic() - started >= 0.95
    assert city.delivered_ids() == [result.event_id]


def test_events_survive_a_client_that_never_closed(
    keys: tuple[str, str], city: FakeCity, make_client: Any, tmp_path: Path
) -> None:
    crashed = make_client()
    city.down = True
    ids = [crashed.entry(plate=PLATE, plate_color="blue").event_id for _ in range(3)]
    crashed.close()  # stops with the events still pending (tests/integration kill -9 it)

    city.down = False
    restarted = make_client()
    assert restarted.pending() == 3
    assert restarted.flush(timeout=5) == 0
    assert city.delivered_ids() == ids


def test_exit_answers_with_the_citys_decision(make_client: Any, city: FakeCity) -> None:
    city.enroll(PLATE, "blue")
    client = make_client()

    decision = client.exit(plate=PLATE, plate_color="blue", lane="X1")

    assert (decision.decision, decision.reason, decision.offline) == ("postpay", "enrolled", False)


def test_a_repeat_waits_for_the_worker_letting_go_of_the_event(
    make_client: Any, city: FakeCity
) -> None:
    """The background worker records the answer, then lets go of the event: a repeat of the
    event id in between answers from the outbox instead of being refused."""
    city.enroll(PLATE, "blue")
    client = make_client()
    first = client.exit(plate=PLATE, plate_color="blue", lane="X1")
    # As the worker holds it in its last step (no public way to pause the worker there).
    [held] = client._claim([first.event_id])  # noqa: SLF001
    threading.Timer(0.3, client._release, [[held]]).start()  # noqa: SLF001

    again = client.exit(plate=PLATE, plate_color="blue", lane="X1", event_id=first.event_id)

    assert (again.event_id, again.decision, again.offline) == (first.event_id, "postpay", False)
    # Held for good (a call that hangs), a repeat still gives up after a while.
    client._claim([first.event_id])  # noqa: SLF001
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="being reported by another call"):
        client.exit(plate=PLATE, plate_color="blue", lane="X1", event_id=first.event_id)
    assert time.monotonic() - started >= 1.5


def test_exit_decides_offline_within_the_deadline(make_client: Any, city: FakeCity) -> None:
    city.enroll(PLATE, "blue")
    client = make_client(exit_deadline=0.3)
    client.refresh_eligibility()
    city.delay_s = 1.5  # the city is there but far too slow

    started = time.monotonic()
    enrolled = client.exit(plate="苏e·12345", plate_color="blue")  # typed differently at the gate
    elapsed = time.monotonic() - started

    assert elapsed < 0.6
    assert (enrolled.decision, enrolled.reason, enrolled.offline) == ("postpay", "enrolled", True)
    stored = client.outbox.get(enrolled.event_id)
    decided_at = datetime.fromisoformat(stored.offline_decision.pop("decided_at"))
    assert abs((datetime.now(UTC) - decided_at).total_seconds()) < 5
    assert stored.offline_decision == {
        "event_id": enrolled.event_id,
        "decision": "postpay",
        "reason": "enrolled",
        "session_id": None,
        "offline": True,
        "eligibility_version": city.eligibility_version,
    }
    city.delay_s = 0
    assert client.flush(timeout=5) == 0
    assert city.delivered_ids() == [enrolled.event_id]  # the exit still reaches the city


def test_exit_offline_refuses_unknown_and_has_no_snapshot_reason(
    make_client: Any, city: FakeCity
) -> None:
    client = make_client(eligibility_refresh_s=3600)
    city.down = True

    no_snapshot = client.exit(plate=PLATE, plate_color="blue")

    assert (no_snapshot.decision, no_snapshot.reason) == ("pay_on_site", "offline_no_snapshot")
    city.down = False
    city.enroll(PLATE, "blue")
    client.refresh_eligibility()
    city.down = True
    stranger = client.exit(plate="苏E99999", plate_color="blue")
    assert (stranger.decision, stranger.reason, stranger.offline) == (
        "pay_on_site",
        "not_eligible",
        True,
    )


def test_snapshot_is_persisted_and_refreshed_only_when_changed(
    make_client: Any, city: FakeCity, tmp_path: Path
) -> None:
    city.enroll(PLATE, "blue")
    client = make_client(eligibility_refresh_s=3600)
    first = client.refresh_eligibility()
    again = client.refresh_eligibility()
    assert (first.version, again.version) == (2, 2)
    assert again.kdf is not None
    assert again.kdf.hash(PLATE, "blue") in again.vehicles
    assert plate_hash(PLATE, "blue") not in again.vehicles  # the unsalted sha256 is not listed
    client.close()

    city.down = True
    reopened = make_client(eligibility_refresh_s=3600)
    assert reopened.snapshot is not None
    assert reopened.snapshot.version == 2
    assert reopened.offline_decision(PLATE, "blue") == ("postpay", "enrolled")


def test_stale_snapshot_is_not_trusted(make_client: Any, city: FakeCity) -> None:
    city.enroll(PLATE, "blue")
    client = make_client(snapshot_max_age_s=0.1, eligibility_refresh_s=3600)
    client.refresh_eligibility()
    time.sleep(0.2)
    assert client.offline_decision(PLATE, "blue") == ("pay_on_site", "offline_snapshot_stale")


def test_async_variants(make_client: Any, city: FakeCity) -> None:
    city.enroll(PLATE, "blue")

    async def gate() -> tuple[Any, Any, Any]:
        async with make_client() as client:
            entry = await client.entry_async(plate=PLATE, plate_color="blue")
            exit_ = await client.exit_async(plate=PLATE, plate_color="blue")
            await client.heartbeat_async(free_spaces=10, total_spaces=100)
            city.down = True
            offline = await client.exit_async(plate=PLATE, plate_color="blue")
            return entry, exit_, offline

    entry, exit_, offline = asyncio.run(gate())

    assert entry.status == "accepted"
    assert (exit_.decision, exit_.offline) == ("postpay", False)
    assert offline.offline is True
    assert city.delivered_ids() == [entry.event_id, exit_.event_id]
    assert "/v1/connector/heartbeats" in city.requests


def test_outbox_list_shows_states_and_problems(make_client: Any, city: FakeCity) -> None:
    client = make_client()
    accepted = client.entry(plate=PLATE, plate_color="blue").event_id
    with pytest.raises(EventRejected):
        client.entry(plate=INVALID_PLATE, plate_color="blue")
    city.down = True
    queued = client.entry(plate="苏E54321", plate_color="blue").event_id
    path = client.outbox.path

    runner = CliRunner()
    listing = runner.invoke(app, ["outbox", "list", path])
    rejected_only = runner.invoke(app, ["outbox", "list", path, "--state", "rejected", "--json"])

    assert listing.exit_code == 0, listing.output
    assert "pending: 1  delivered: 1  rejected: 1" in listing.output
    assert accepted in listing.output
    assert queued in listing.output
    assert "plate_invalid" in listing.output
    [row] = [json.loads(line) for line in rejected_only.output.splitlines()]
    assert (row["state"], row["answer"]["code"], row["body"]["plate"]) == (
        "rejected",
        "plate_invalid",
        INVALID_PLATE,
    )


def test_outbox_keeps_one_row_per_event_id(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3")
    assert outbox.add("e1", "entry", {"plate": "x"}) == (1, True)
    assert outbox.add("e1", "entry", {"plate": "x"}) == (1, False)
    assert outbox.count(EventState.pending) == 1
    outbox.close()
    with sqlite3.connect(tmp_path / "o.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT event_id FROM events").fetchall() == [("e1",)]


def test_plate_hash_matches_the_citys_normalisation() -> None:
    assert plate_hash("苏e·12345", "蓝") == plate_hash("苏E12345", "blue")
    assert plate_hash("ＡＢ１２３", "blue") == plate_hash("AB123", "blue")
