"""The eligibility snapshot lists each vehicle hashed with the car park's own salt: the gate
hashes the plate in front of it once, and decides offline within the exit deadline."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import pytest
from citypark_connector import plate_hash
from conftest import FakeCity

log = logging.getLogger(__name__)
PLATE = "苏E12345"


def test_offline_look_up_hashes_the_plate_with_the_lots_salt(
    make_client: Any, city: FakeCity
) -> None:
    city.enroll(PLATE, "blue")
    client = make_client(exit_deadline=0.8, eligibility_refresh_s=3600)
    snap = client.refresh_eligibility()
    assert snap.kdf is not None
    assert snap.kdf.salt == city.salt
    # Neither the plain sha256 nor an unsalted scrypt of the enrolled plate is in the list.
    unsalted = hashlib.scrypt(f"{PLATE}:blue".encode(), salt=b"", n=2**14, r=8, p=1).hex()
    assert {plate_hash(PLATE, "blue"), unsalted}.isdisjoint(snap.vehicles)
    city.delay_s = 2.0  # the city is there but far too slow: the gate decides alone

    started = time.perf_counter()
    enrolled = client.exit(plate="苏e·12345", plate_color="蓝")  # typed differently
    stranger = client.exit(plate="苏E99999", plate_color="blue")
    elapsed = time.perf_counter() - started

    assert (enrolled.decision, enrolled.reason, enrolled.offline) == ("postpay", "enrolled", True)
    assert (stranger.decision, stranger.reason, stranger.offline) == (
        "pay_on_site",
        "not_eligible",
        True,
    )
    # The figures for docs/privacy.md, not an assertion: one look-up, and two whole exits.
    looked_up = time.perf_counter()
    client.offline_decision(PLATE, "blue")
    log.info("look-up %.1f ms; two exits %.2f s", 1000 * (time.perf_counter() - looked_up), elapsed)
    city.delay_s = 0


def test_another_lot_gets_other_hashes_for_the_same_vehicle(
    make_client: Any, city: FakeCity
) -> None:
    city.enroll(PLATE, "blue")
    first = make_client(eligibility_refresh_s=3600).refresh_eligibility()
    other = FakeCity(public_pem=city.public_pem, eligible=set(city.eligible))
    assert other.salt != city.salt
    assert set(other.hashed()).isdisjoint(first.vehicles)


def test_an_unsalted_snapshot_is_neither_taken_nor_kept(make_client: Any, city: FakeCity) -> None:
    city.enroll(PLATE, "blue")
    client = make_client(eligibility_refresh_s=3600)
    good = client.refresh_eligibility()
    city.snapshot_format = 1
    city.enroll("苏E54321", "blue")
    with pytest.raises(ValueError, match="format"):
        client.refresh_eligibility()
    assert client.snapshot == good  # the snapshot in hand stays in use
    # A snapshot stored by an older SDK (sha256, no salt) is dropped on start.
    stored = json.loads(client.outbox.get_meta("eligibility"))
    stored.pop("format"), stored.pop("kdf")
    stored["vehicles"] = [plate_hash(PLATE, "blue")]
    client.outbox.set_meta("eligibility", json.dumps(stored))
    client.close()
    reopened = make_client(eligibility_refresh_s=3600)
    assert reopened.snapshot is None
    assert reopened.offline_decision(PLATE, "blue") == ("pay_on_site", "offline_no_snapshot")


def test_a_partial_snapshot_never_replaces_a_complete_one(make_client: Any, city: FakeCity) -> None:
    city.enroll(PLATE, "blue")
    client = make_client(eligibility_refresh_s=3600)
    complete = client.refresh_eligibility()
    # The city's next version is still being hashed (after a salt change, say): a gate that
    # took it would send the enrolled driver to pay at the gate.
    city.eligibility_version += 1
    city.snapshot_complete = False
    kept = client.refresh_eligibility()
    assert kept.version == complete.version
    assert client.offline_decision(PLATE, "blue") == ("postpay", "enrolled")
    # Once complete, the new version is taken.
    city.snapshot_complete = True
    assert client.refresh_eligibility().version == complete.version + 1
