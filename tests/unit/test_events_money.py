from __future__ import annotations

import pytest
from pydantic import SecretStr

from shared.events import CloudEvent, EventType, LotEvent, new_event, session_id_for
from shared.money import commission, ensure_fen, format_yuan
from shared.settings import Settings

KEYS = Settings(jwt_secret=SecretStr("unit-secret-0123456789abcdefghij"))


def test_cloudevent_round_trip_is_structured_json() -> None:
    data = LotEvent(
        event_id="e1",
        kind="entry",
        lot_id="L",
        lot_code="GS-1",
        district="gusu",
        operator_id="O",
        plate="苏E12345",
        plate_color="blue",
        occurred_at="2026-11-25T08:00:00+08:00",
        received_at="2026-11-25T00:00:01Z",
    ).sealed(KEYS)
    event = new_event(EventType.connector_entry, source="gateway", data=data, subject="L")
    again = CloudEvent.from_json(event.to_json())
    assert again == event
    assert again.specversion == "1.0"
    assert again.datacontenttype == "application/json"
    assert "plate" not in again.data  # sealed: plate_enc and plate_ref only
    assert LotEvent.opened(KEYS, again.data) == data


def test_session_id_is_derived_from_the_entry() -> None:
    assert session_id_for("lot", "e1") == session_id_for("lot", "e1")
    assert session_id_for("lot", "e1") != session_id_for("lot2", "e1")


def test_money_is_integer_fen() -> None:
    assert format_yuan(1234) == "¥12.34"
    assert format_yuan(-5) == "-¥0.05"
    assert commission(10_000, 600) == 600
    assert commission(333, 600) == 20  # 19.98 rounds half up
    with pytest.raises(TypeError):
        ensure_fen(1.5)
    with pytest.raises(TypeError):
        ensure_fen(True)
