"""Dates and instants that are read the way the OpenAPI document describes them.

Pydantic's lax mode reads `0` and `"0"` as 1970-01-01 and a midnight date-time as a date, while
the schema says `format: date` / `format: date-time`. These types take only the written form
(or a value already parsed); anything else is a 422 like any other schema violation.
`JsonInt` takes a JSON number that is whole (`600` or `600.0`, as JSON Schema's `integer`) and
no string or boolean; for booleans and other numbers `Field(strict=True)` does the same.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BeforeValidator, Field

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# RFC 3339, read as leniently as before for what connectors already send (no seconds, +0800);
# a missing offset is left to the endpoints that insist on one (with their own code).
_INSTANT = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?([Zz]|[+-]\d{2}:?\d{2})?"
)


def _written(pattern: re.Pattern[str], parsed: type, what: str) -> Any:
    def check(value: Any) -> Any:
        if isinstance(value, parsed):
            return value
        if isinstance(value, str) and pattern.fullmatch(value):
            return value
        raise ValueError(f"expected {what}")

    return check


def _json_number(value: Any) -> Any:
    if isinstance(value, bool | str):  # lax mode would read "1" and true as 1
        raise ValueError("expected a JSON number")
    return value


JsonInt = Annotated[int, BeforeValidator(_json_number)]
IsoDate = Annotated[date, BeforeValidator(_written(_DATE, date, "a date, YYYY-MM-DD"))]
_instant = _written(_INSTANT, datetime, "an RFC 3339 date-time, e.g. 2026-01-31T08:00:00+08:00")
Instant = Annotated[datetime, BeforeValidator(_instant)]
AwareInstant = Annotated[AwareDatetime, BeforeValidator(_instant)]
# A whole day or an instant (passes): each only in its written form.
_DAY_OR_INSTANT = re.compile(f"{_DATE.pattern}|{_INSTANT.pattern}")
DayOrInstant = Annotated[
    AwareDatetime | date,
    BeforeValidator(_written(_DAY_OR_INSTANT, date, "a date or an RFC 3339 date-time")),
]


# What billing's phone normaliser takes: a mainland mobile number, optionally +86/86 first,
# with spaces or dashes anywhere. Documented only: the normaliser refuses the rest with its own
# `phone_invalid`, which clients already know.
PHONE_PATTERN = r"^[\s-]*((\+[\s-]*)?8[\s-]*6[\s-]*)?1[\s-]*[3-9]([\s-]*[0-9]){9}[\s-]*$"
Phone = Annotated[
    str,
    Field(max_length=40, json_schema_extra={"pattern": PHONE_PATTERN}, examples=["13812345678"]),
]
