"""`canonical`: the connector payloads (SPEC §4), batched, each naming its car park by code:
`{"events": [{"kind", "event_id", "lot", "plate", "plate_color", "vehicle_type",
"occurred_at", "lane"}]}`."""

from __future__ import annotations

import json
import uuid
from typing import Any

from shared.dialects.common import (
    BodyMalformed,
    Dialect,
    Parsed,
    Reason,
    Record,
    RecordError,
    collect,
    color_field,
    decode_text,
    kind_field,
    loose_serial,
    plate_field,
    rfc3339_field,
    text_field,
    vehicle_type_field,
)


def _event_id(value: object) -> str:
    if not isinstance(value, str):
        raise RecordError(Reason.field_missing, "event_id is missing")
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise RecordError(Reason.serial_invalid, f"event_id {value!r} is not a UUID") from exc


def _record(index: int, item: Any) -> Record:
    if not isinstance(item, dict):
        raise RecordError(Reason.malformed_record, "each event must be an object")
    return Record(
        index=index,
        serial=_event_id(item.get("event_id")),
        kind=kind_field(item.get("kind")),
        lot_code=text_field(item.get("lot"), "lot"),
        plate=plate_field(item.get("plate")),
        plate_color=color_field(item.get("plate_color")),
        occurred_at=rfc3339_field(item.get("occurred_at"), "occurred_at"),
        vehicle_type=vehicle_type_field(item.get("vehicle_type")),
        lane=text_field(item.get("lane"), "lane", max_length=40, required=False) or None,
    )


def _serial(item: Any) -> str | None:
    return loose_serial(item.get("event_id")) if isinstance(item, dict) else None


def parse(body: bytes, max_records: int) -> Parsed:
    try:
        doc = json.loads(decode_text(body))
    except json.JSONDecodeError as exc:
        raise BodyMalformed(f"not JSON: {exc.msg} at line {exc.lineno}") from exc
    events = doc.get("events") if isinstance(doc, dict) else None
    if not isinstance(events, list):
        raise BodyMalformed('expected {"events": [...]}')
    return collect(Dialect.canonical, events, max_records, _record, _serial)
