"""`csv`: `lot,plate,color,kind,time,id` with a required header (SPEC §5). Columns may come in
any order and extra columns are ignored. Each line is parsed on its own (CRLF, CR or LF), so a
broken quote or a stray NUL rejects its own line and nothing else."""

from __future__ import annotations

import csv
import re
from typing import Final

from shared.dialects.common import (
    BodyEmpty,
    CsvHeaderInvalid,
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
    serial_field,
    text_field,
)

COLUMNS: Final = ("lot", "plate", "color", "kind", "time", "id")
_LINES: Final = re.compile(r"\r\n|\r|\n")


def _cells(line: str) -> list[str]:
    try:
        return next(csv.reader([line], strict=True))
    except (csv.Error, StopIteration) as exc:
        raise RecordError(Reason.malformed_record, f"not a CSV line: {exc}") from exc


def parse(body: bytes, max_records: int) -> Parsed:
    lines = [line for line in _LINES.split(decode_text(body)) if line.strip()]
    if not lines:
        raise BodyEmpty("Send the header line and at least one record")
    try:
        header = [h.strip().lower() for h in _cells(lines[0])]
    except RecordError as exc:
        raise CsvHeaderInvalid(exc.detail) from exc
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise CsvHeaderInvalid(
            f"the first line must name the columns {','.join(COLUMNS)}; missing {','.join(missing)}"
        )
    at = {name: header.index(name) for name in COLUMNS}

    def record(index: int, line: str) -> Record:
        cells = _cells(line)
        if len(cells) != len(header):
            raise RecordError(
                Reason.malformed_record, f"{len(cells)} fields where the header has {len(header)}"
            )
        return Record(
            index=index,
            serial=serial_field(cells[at["id"]], "id"),
            kind=kind_field(cells[at["kind"]]),
            lot_code=text_field(cells[at["lot"]], "lot"),
            plate=plate_field(cells[at["plate"]]),
            plate_color=color_field(cells[at["color"]]),
            occurred_at=rfc3339_field(cells[at["time"]], "time"),
        )

    def serial(line: str) -> str | None:
        try:
            cells = _cells(line)
        except RecordError:
            return None
        return loose_serial(cells[at["id"]]) if len(cells) > at["id"] else None

    return collect(Dialect.csv, lines[1:], max_records, record, serial)
