"""District dialects (SPEC §5): pure parsers from a body to canonical records, one result per
record. Shared by the gateway (which answers per record) and the backfill command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from shared.dialects import canonical, csv_lines, legacy_json, xml_events
from shared.dialects.common import (
    BatchTooLarge,
    BodyEmpty,
    BodyMalformed,
    CsvHeaderInvalid,
    Dialect,
    EncodingInvalid,
    Parsed,
    Reason,
    Record,
    Rejected,
    XmlForbidden,
)

__all__ = [
    "BODY_PROBLEMS",
    "BatchTooLarge",
    "Dialect",
    "Parsed",
    "Reason",
    "Record",
    "Rejected",
    "parse",
]

MAX_RECORDS: Final = 1000

_PARSERS: Final[dict[Dialect, Callable[[bytes, int], Parsed]]] = {
    Dialect.canonical: canonical.parse,
    Dialect.legacy_json: legacy_json.parse,
    Dialect.xml: xml_events.parse,
    Dialect.csv: csv_lines.parse,
}

# What makes a whole body unusable (422) or too big (413); anything else is per record.
BODY_PROBLEMS: Final = (
    BodyEmpty,
    BodyMalformed,
    EncodingInvalid,
    XmlForbidden,
    CsvHeaderInvalid,
    BatchTooLarge,
)


def parse(dialect: Dialect | str, body: bytes, *, max_records: int = MAX_RECORDS) -> Parsed:
    """Every record of `body`, accepted or rejected with its reason; raises one of
    `BODY_PROBLEMS` when the body as a whole cannot be read."""
    return _PARSERS[Dialect(dialect)](body, max_records)
