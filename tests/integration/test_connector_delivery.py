"""No event lost, none duplicated: a gateway outage mid-run, and an SDK process killed -9.

Counted on the server side: every event's CloudEvent on the district's Kafka topic.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.demo import INVALID_PLATES, SimLot, Simulator
from shared.runtime import Runtime
from shared.settings import Settings
from shared.topics import lot_events
from tests.conftest import Infra
from tests.integration.sdk_city import (
    Gateway,
    Lot,
    connector_settings,
    drop_district_topic,
    events_on_topic,
    new_district,
    new_lot,
)

pytestmark = pytest.mark.integration
PORT = 18111
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rt(infra: Infra, fresh_database: str, settings: Settings) -> Runtime:
    s = connector_settings(fresh_database, infra.redis_url, infra.kafka_bootstrap, PORT)
    redis.Redis.from_url(s.redis_url).flushdb()
    return Runtime(s, source="gateway")


@pytest.fixture
def gw(rt: Runtime) -> Iterator[Gateway]:
    server = Gateway(rt, PORT)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def district(rt: Runtime, gw: Gateway) -> Iterator[str]:
    code = new_district(gw)
    yield code
    drop_district_topic(rt, code)


def outbox_ids(outboxes: list[Path]) -> dict[str, tuple[str, str]]:
    """event id → (state, plate), over the given outbox files."""
    states: dict[str, tuple[str, str]] = {}
    for path in outboxes:
        with sqlite3.connect(path) as db:
            rows = db.execute("SELECT event_id, state, body FROM events").fetchall()
        states.update({e: (state, json.loads(body)["plate"]) for e, state, body in rows})
    return states


def test_gateway_down_during_a_simulated_run_delivers_every_event_once(
    gw: Gateway, rt: Runtime, district: str, tmp_path: Path
) -> None:
    lots = [new_lot(gw, district) for _ in range(3)]
    simulator = Simulator(
        gw.url,
        [SimLot(lot.code, lot.key.key_id, lot.key.private_pem, district) for lot in lots],
        rate=20.0,
        outbox_dir=tmp_path / "outbox",
        invalid_share=0.05,
        duplicate_share=0.1,
        seed=5,
        exit_deadline=0.3,
        day_curve=False,  # ~180 parkings at any hour, so duplicates and misreads occur
    )
    stop = threading.Event()
    runner = threading.Thread(target=simulator.run, args=(stop, 9.0))
    runner.start()
    time.sleep(2.0)
    gw.stop()  # the city's uplink goes away mid-run ...
    time.sleep(3.0)
    assert simulator.pending() > 0, "nothing queued while the gateway was down"
    gw.start()  # ... and comes back
    runner.join(timeout=60)
    left = sum(c.flush(timeout=60) for c in simulator.clients)
    stats = simulator.stats
    simulator.close()

    assert left == 0
    states = outbox_ids([tmp_path / "outbox" / f"{lot.key.key_id}.sqlite3" for lot in lots])
    delivered = {e for e, (state, _) in states.items() if state == "delivered"}
    rejected = {e: plate for e, (state, plate) in states.items() if state == "rejected"}
    counts = events_on_topic(rt.settings.kafka_bootstrap, lot_events(district))
    assert stats.errors == 0
    assert stats.offline > 0  # exits decided at the gate while the city was away
    assert stats.duplicates_sent > 0
    assert len(states) >= stats.entries + stats.exits  # every reported event was stored
    assert len(states) == len(delivered) + len(rejected)  # none left pending
    assert rejected  # and only unreadable plates were refused
    assert set(rejected.values()) <= set(INVALID_PLATES)
    assert set(counts) == delivered  # every delivered event is on the topic, nothing else
    assert set(counts.values()) == {1}  # exactly once, despite retries and re-deliveries


def _sender(
    gw: Gateway, lot: Lot, key_file: Path, outbox: Path, *extra: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.sdk_proc.sender", gw.url, lot.key.key_id,
         str(key_file), str(outbox), "400", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_sdk_killed_mid_send_loses_nothing_and_duplicates_nothing(
    gw: Gateway, rt: Runtime, district: str, tmp_path: Path
) -> None:
    lot = new_lot(gw, district)
    key_file = tmp_path / "lot.key"
    key_file.write_text(lot.key.private_pem)
    outbox = tmp_path / "gate.sqlite3"
    promised: list[str] = []
    rng = random.Random(3)
    for _ in range(3):
        proc = _sender(gw, lot, key_file, outbox)
        assert proc.stdout is not None
        kill_after = rng.randint(20, 120)
        for n, line in enumerate(proc.stdout, 1):
            promised.append(line.split()[0])
            if n >= kill_after:
                break
        proc.send_signal(signal.SIGKILL)  # mid-send: the next entry is on its way
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
    finisher = _sender(gw, lot, key_file, outbox, "--flush-only")
    out, _ = finisher.communicate(timeout=90)
    assert finisher.returncode == 0, out

    states = outbox_ids([outbox])
    counts = events_on_topic(rt.settings.kafka_bootstrap, lot_events(district))
    assert set(promised) <= set(states)  # whatever entry() returned for is in the outbox
    assert {state for state, _ in states.values()} == {"delivered"}
    assert set(counts) == set(states)  # nothing lost: every stored event reached the city
    assert set(counts.values()) == {1}  # nothing duplicated
