"""Personal data encryption and blind indexes (shared/pii)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from shared import pii
from shared.settings import Settings

MASTER = "unit-pii-master-7f3a9c2e5b8d1f4a6c0e"


def settings(**kw: object) -> Settings:
    return Settings(jwt_secret=SecretStr(MASTER), **kw)  # type: ignore[arg-type]


def test_round_trip_names_its_key_and_never_repeats() -> None:
    s = settings()
    a, b = pii.encrypt(s, "苏E12345"), pii.encrypt(s, "苏E12345")
    assert a != b  # a fresh nonce each time: equal plates do not show as equal
    assert "苏E12345" not in a
    assert "12345" not in a
    assert pii.key_id_of(a) == pii.DERIVED_KEY_ID
    assert pii.decrypt(s, a) == pii.decrypt(s, b) == "苏E12345"
    assert pii.reveal(s, "苏E12345") == "苏E12345"  # a row not yet converted


def test_rotation_reads_old_values_and_writes_under_the_new_key() -> None:
    old = settings(data_keys={"k1": SecretStr("k1-" + "a1b2c3d4" * 5)}, data_key_id="k1")
    token = pii.encrypt(old, "13800000001")
    new = settings(
        data_keys={
            "k1": SecretStr("k1-" + "a1b2c3d4" * 5),
            "k2": SecretStr("k2-" + "e5f6a7b8" * 5),
        },
        data_key_id="k2",
    )
    assert pii.decrypt(new, token) == "13800000001"
    assert pii.key_id_of(pii.encrypt(new, "x")) == "k2"
    # a process that lost the old key says so instead of returning garbage
    gone = settings(data_keys={"k2": SecretStr("k2-" + "e5f6a7b8" * 5)}, data_key_id="k2")
    with pytest.raises(pii.DataKeyUnknown):
        pii.decrypt(gone, token)


def test_a_tampered_value_or_key_id_is_refused() -> None:
    s = settings(
        data_keys={
            "k1": SecretStr("k1-" + "a1b2c3d4" * 5),
            "k2": SecretStr("k2-" + "e5f6a7b8" * 5),
        },
        data_key_id="k1",
    )
    token = pii.encrypt(s, "13800000001")
    relabelled = token.replace(".k1.", ".k2.", 1)
    with pytest.raises(pii.DataKeyUnknown):
        pii.decrypt(s, relabelled)
    body = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(pii.DataKeyUnknown):
        pii.decrypt(s, body)


def test_blind_indexes_are_stable_keyed_and_kind_separated() -> None:
    s = settings()
    assert pii.plate_ref(s, "苏E12345", "blue") == pii.plate_ref(s, "苏E12345", "blue")
    assert pii.plate_ref(s, "苏E12345", "blue") != pii.plate_ref(s, "苏E12345", "green")
    assert pii.blind_index(s, "phone", "1") != pii.blind_index(s, "plate", "1")
    other = Settings(jwt_secret=SecretStr("another-master-9d8c7b6a5f4e3d2c1b0a"))
    assert pii.plate_ref(other, "苏E12345", "blue") != pii.plate_ref(s, "苏E12345", "blue")
    pinned = settings(data_index_key=SecretStr("index-" + "0f1e2d3c" * 5))
    assert pii.plate_ref(pinned, "苏E12345", "blue") != pii.plate_ref(s, "苏E12345", "blue")


def test_a_value_sealed_under_a_missing_key_is_dead_lettered_at_once_not_retried() -> None:
    from shared.workqueue import Failure, classify

    writer = settings(data_keys={"k9": SecretStr("k9-" + "a1b2c3d4" * 5)}, data_key_id="k9")
    reader = settings()
    with pytest.raises(pii.DataKeyUnknown) as caught:
        pii.decrypt(reader, pii.encrypt(writer, "苏E12345"))
    assert classify(caught.value) is Failure.bad_data
