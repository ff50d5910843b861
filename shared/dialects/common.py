"""What every dialect shares: the parsed record, per-record rejections, body-level problems,
and the field readers (plates, colours, times, serials) whose failures become reason codes."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final, TypeVar
from zoneinfo import ZoneInfo

from shared.errors import PlateColorInvalid, PlateInvalid, problem
from shared.events import Kind
from shared.plates import PlateColor, normalize_plate, parse_plate_color

SHANGHAI: Final = ZoneInfo("Asia/Shanghai")
UTF8_BOM: Final = b"\xef\xbb\xbf"
SERIAL: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
T = TypeVar("T")


class Dialect(StrEnum):
    canonical = "canonical"
    legacy_json = "legacy-json"
    xml = "xml"
    csv = "csv"


class Reason(StrEnum):
    """Why one record was refused. Stable: district platforms match on these codes."""

    malformed_record = "malformed_record"  # not an object / element / row of the right shape
    field_missing = "field_missing"
    field_invalid = "field_invalid"
    serial_invalid = "serial_invalid"
    kind_invalid = "kind_invalid"
    time_invalid = "time_invalid"  # unparseable, impossible (20240230) or without offset
    plate_invalid = "plate_invalid"
    plate_color_invalid = "plate_color_invalid"
    # Decided after parsing, by whoever knows the registry and the clock.
    lot_unknown = "lot_unknown"
    lot_other_district = "lot_other_district"
    occurred_at_out_of_range = "occurred_at_out_of_range"


# The whole body is unusable: no record can be told apart from another.
BodyEmpty = problem(422, "body_empty", "The request body is empty")
BodyMalformed = problem(422, "body_malformed", "The body is not a document of the dialect")
EncodingInvalid = problem(422, "encoding_invalid", "The body is not UTF-8")
XmlForbidden = problem(422, "xml_forbidden", "DTDs, entities and external references are refused")
CsvHeaderInvalid = problem(422, "csv_header_invalid", "The CSV header is missing or incomplete")
BatchTooLarge = problem(413, "batch_too_large", "Too many records in one batch")


class RecordError(Exception):
    """One record is refused; its neighbours are not affected."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Record:
    """A district record in canonical terms; `serial` is the district's own id for it."""

    index: int
    serial: str
    kind: Kind
    lot_code: str
    plate: str
    plate_color: PlateColor
    occurred_at: datetime  # aware, UTC
    vehicle_type: str = "small"
    lane: str | None = None


@dataclass(frozen=True)
class Rejected:
    index: int
    serial: str | None
    reason: Reason
    detail: str


@dataclass
class Parsed:
    dialect: Dialect
    records: list[Record] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.records) + len(self.rejected)


def decode_text(body: bytes) -> str:
    """UTF-8 with or without a BOM (Windows tools write one); anything else is refused."""
    if body.startswith(UTF8_BOM):
        body = body[len(UTF8_BOM) :]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EncodingInvalid(f"byte {exc.start} is not UTF-8; send the body as UTF-8") from exc
    if not text.strip():
        raise BodyEmpty("Send at least one record")
    return text


def text_field(value: object, name: str, *, max_length: int = 64, required: bool = True) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RecordError(Reason.field_missing, f"{name} is missing")
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RecordError(Reason.field_invalid, f"{name} must be a string")
    text = str(value).strip()
    if len(text) > max_length or any(not ch.isprintable() for ch in text):
        raise RecordError(Reason.field_invalid, f"{name} is too long or holds control characters")
    return text


def serial_field(value: object, name: str) -> str:
    text = text_field(value, name)
    if not SERIAL.fullmatch(text):
        raise RecordError(
            Reason.serial_invalid, f"{name} {text!r} must be 1-64 of A-Z a-z 0-9 . _ : -"
        )
    return text


def plate_field(value: object) -> str:
    if not isinstance(value, str):
        raise RecordError(Reason.plate_invalid, "the plate is missing or not a string")
    try:
        return normalize_plate(value)
    except PlateInvalid as exc:
        raise RecordError(Reason.plate_invalid, exc.detail) from exc


def color_field(value: object) -> PlateColor:
    if not isinstance(value, str):
        raise RecordError(Reason.plate_color_invalid, "the plate colour is missing")
    try:
        return parse_plate_color(value)
    except PlateColorInvalid as exc:
        raise RecordError(Reason.plate_color_invalid, exc.detail) from exc


def kind_field(value: object) -> Kind:
    text = value.strip().lower() if isinstance(value, str) else value
    if text in ("entry", "exit"):
        return Kind(text)
    raise RecordError(Reason.kind_invalid, f"kind must be entry or exit, got {value!r}")


def rfc3339_field(value: object, name: str) -> datetime:
    """RFC 3339 with an offset; a time without one cannot be placed and is refused."""
    if not isinstance(value, str) or not value.strip():
        raise RecordError(Reason.field_missing, f"{name} is missing")
    text = value.strip()
    # fromisoformat also takes bare dates and week dates; RFC 3339 needs a full date-time.
    if not (text.isascii() and text.isprintable()) or len(text) < 19 or text[10] not in "Tt ":
        raise RecordError(Reason.time_invalid, f"{name} {text!r} is not an RFC 3339 date-time")
    try:
        at = datetime.fromisoformat(text.upper())
    except ValueError as exc:
        raise RecordError(Reason.time_invalid, f"{name} {text!r}: {exc}") from exc
    if at.tzinfo is None:
        raise RecordError(Reason.time_invalid, f"{name} {text!r} needs a UTC offset")
    return at.astimezone(UTC)


def local_compact_time(value: object, name: str) -> datetime:
    """`yyyyMMddHHmmss` on the Asia/Shanghai wall clock (no DST there, so never ambiguous)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RecordError(Reason.field_missing, f"{name} is missing")
    text = str(value).strip()
    if len(text) != 14 or not text.isascii() or not text.isdigit():
        raise RecordError(Reason.time_invalid, f"{name} {text!r} is not yyyyMMddHHmmss")
    try:
        local = datetime.strptime(text, "%Y%m%d%H%M%S")
    except ValueError as exc:  # 20240230..., 25th hour, 61st minute
        raise RecordError(Reason.time_invalid, f"{name} {text!r} is not a real time") from exc
    return local.replace(tzinfo=SHANGHAI).astimezone(UTC)


def vehicle_type_field(value: object) -> str:
    if value is None:
        return "small"
    if value in ("small", "large"):
        return str(value)
    raise RecordError(Reason.field_invalid, f"vehicle_type must be small or large, got {value!r}")


def collect(
    dialect: Dialect,
    items: Sequence[T],
    max_records: int,
    to_record: Callable[[int, T], Record],
    serial_of: Callable[[T], str | None],
) -> Parsed:
    """Parse record by record: a bad one is rejected with its reason, its neighbours go on."""
    if len(items) > max_records:
        raise BatchTooLarge(f"{len(items)} records; at most {max_records} per batch")
    out = Parsed(dialect)
    for index, item in enumerate(items):
        try:
            out.records.append(to_record(index, item))
        except RecordError as exc:
            out.rejected.append(Rejected(index, serial_of(item), exc.reason, exc.detail))
    return out


def loose_serial(value: object) -> str | None:
    """The serial as far as it can be read, to label a rejected record in the answer."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()[:64]
    return text if text.isprintable() and text else None
