"""`legacy-json`: pinyin field names and Shanghai wall-clock times (SPEC §5):
`{"tccbh": lot code, "cph": plate, "cpys": colour code, "crlx": 1 entry | 2 exit,
"sj": "yyyyMMddHHmmss", "lsh": serial}`. A body is an array of such objects, or one object.
Fields of their own that some platforms add are ignored."""

from __future__ import annotations

import json
from typing import Any, Final

from shared.dialects.common import (
    BodyMalformed,
    Dialect,
    Parsed,
    Reason,
    Record,
    RecordError,
    collect,
    decode_text,
    local_compact_time,
    loose_serial,
    plate_field,
    serial_field,
    text_field,
)
from shared.events import Kind
from shared.plates import PlateColor

COLOURS: Final[dict[str, PlateColor]] = {
    "0": PlateColor.BLUE,
    "1": PlateColor.YELLOW,
    "2": PlateColor.BLACK,
    "3": PlateColor.WHITE,
    "4": PlateColor.GREEN,
}
KINDS: Final[dict[str, Kind]] = {"1": Kind.entry, "2": Kind.exit}


def _code(value: object, table: dict[str, Any], reason: Reason, name: str) -> Any:
    # Codes come as 0 or "0" depending on the platform; both mean the same.
    key = str(value).strip() if isinstance(value, str | int) and not isinstance(value, bool) else ""
    if key not in table:
        raise RecordError(reason, f"{name} {value!r} is not one of {', '.join(table)}")
    return table[key]


def _record(index: int, item: Any) -> Record:
    if not isinstance(item, dict):
        raise RecordError(Reason.malformed_record, "each record must be an object")
    return Record(
        index=index,
        serial=serial_field(item.get("lsh"), "lsh"),
        kind=_code(item.get("crlx"), KINDS, Reason.kind_invalid, "crlx"),
        lot_code=text_field(item.get("tccbh"), "tccbh"),
        plate=plate_field(item.get("cph")),
        plate_color=_code(item.get("cpys"), COLOURS, Reason.plate_color_invalid, "cpys"),
        occurred_at=local_compact_time(item.get("sj"), "sj"),
    )


def _serial(item: Any) -> str | None:
    return loose_serial(item.get("lsh")) if isinstance(item, dict) else None


def parse(body: bytes, max_records: int) -> Parsed:
    try:
        doc = json.loads(decode_text(body))
    except json.JSONDecodeError as exc:
        raise BodyMalformed(f"not JSON: {exc.msg} at line {exc.lineno}") from exc
    records = [doc] if isinstance(doc, dict) else doc
    if not isinstance(records, list):
        raise BodyMalformed("expected an array of records or one record object")
    return collect(Dialect.legacy_json, records, max_records, _record, _serial)
