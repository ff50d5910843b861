"""Plates leave a process sealed (events) or masked (log lines), never in clear."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import pytest
import structlog
from pydantic import SecretStr

from shared import pii
from shared.events import (
    AccountUpdated,
    Kind,
    LotEvent,
    ParkingEvent,
    PostpayStatus,
    SessionClosed,
    VehicleRef,
)
from shared.logging import configure_logging, mask_personal_data
from shared.settings import Settings

KEYS = Settings(jwt_secret=SecretStr("unit-secret-long-enough-for-hs256-0123456789"))
PLATE = "苏E7T4Q2"
AT = datetime(2026, 3, 1, 8, tzinfo=UTC)


def lot_event(**kw: object) -> LotEvent:
    fields: dict[str, object] = {
        "event_id": "e1",
        "kind": Kind.entry,
        "lot_id": "lot",
        "lot_code": "L1",
        "district": "gusu",
        "operator_id": "op",
        "plate": PLATE,
        "plate_color": "blue",
        "occurred_at": AT,
        "received_at": AT,
    }
    return LotEvent.model_validate({**fields, **kw})


def test_a_sealed_event_carries_the_plate_encrypted_and_its_pseudonym_only() -> None:
    wire = lot_event().sealed(KEYS).model_dump_json()
    assert PLATE not in wire
    doc = json.loads(wire)
    assert "plate" not in doc
    assert pii.decrypt(KEYS, doc["plate_enc"]) == PLATE
    assert doc["plate_ref"] == pii.plate_ref(KEYS, PLATE, "blue")
    assert LotEvent.opened(KEYS, doc).plate == PLATE


def test_an_unsealed_plate_never_serialises() -> None:
    with pytest.raises(ValueError, match="sealed"):
        lot_event().model_dump_json()
    with pytest.raises(ValueError, match="sealed"):
        AccountUpdated(
            driver_id="d",
            version=1,
            postpay=PostpayStatus.active,
            vehicles=[VehicleRef(plate=PLATE, plate_color="blue")],
        ).model_dump(mode="json")


def test_events_from_before_sealing_are_still_read_and_passed_on_sealed() -> None:
    old = {**json.loads(lot_event().sealed(KEYS).model_dump_json()), "plate": PLATE}
    del old["plate_enc"], old["plate_ref"]
    parsed = ParkingEvent.opened(KEYS, old)
    assert parsed.plate == PLATE
    assert PLATE not in parsed.model_dump_json()
    closed = SessionClosed.opened(
        KEYS,
        {
            "session_id": "s",
            "lot_id": "lot",
            "lot_code": "L1",
            "district": "gusu",
            "operator_id": "op",
            "plate": PLATE,
            "plate_color": "blue",
            "vehicle_type": "small",
            "entered_at": AT.isoformat(),
            "exited_at": AT.isoformat(),
            "decision": "postpay",
        },
    )
    assert closed.plate == PLATE
    assert closed.plate_ref == pii.plate_ref(KEYS, PLATE, "blue")
    account = AccountUpdated.opened(
        KEYS,
        {
            "driver_id": "d",
            "version": 2,
            "postpay": "active",
            "vehicles": [{"plate": PLATE, "plate_color": "blue", "verified": True}],
        },
    )
    assert account.vehicles[0].plate == PLATE
    assert PLATE not in account.model_dump_json()


def test_log_values_are_masked_wherever_a_plate_or_mobile_stands() -> None:
    out = mask_personal_data(
        None,
        "info",
        {
            "event": f"refused {PLATE}",
            "plate": PLATE,
            "phone": "13912345678",
            "nested": {"items": ["浙A·1234X", 7]},
            "error": ValueError("no driver with phone 13812345678"),
            "count": 3,
        },
    )
    rendered = json.dumps(out, ensure_ascii=False)
    for clear in (PLATE, "13912345678", "浙A·1234X", "13812345678"):
        assert clear not in rendered
    assert out["plate"] == "苏E***Q2"
    assert out["count"] == 3


def test_configured_logging_masks_structlog_and_library_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO")
    try:
        structlog.get_logger("t").info("sign_in", phone="13912345678", plate=PLATE)
        logging.getLogger("kafka.test").warning("record for %s", PLATE)
        err = capsys.readouterr().err
    finally:
        structlog.reset_defaults()
    assert "139****5678" in err
    assert "苏E***Q2" in err
    assert "13912345678" not in err
    assert PLATE not in err
