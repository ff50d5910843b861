"""Golden files per dialect: each body under tests/golden/districts/<dialect>/ and, next to
it, `<name>.expected.json` — what every record becomes (or the problem the whole body is).

The expected files were checked by hand; `CITYPARK_UPDATE_GOLDEN=1` rewrites them from the
parsers, to be reviewed in the diff before they are committed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from shared import dialects
from shared.errors import Problem

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "districts"
CASES = sorted(p for p in GOLDEN.glob("*/*") if not p.name.endswith(".expected.json"))


def outcome(dialect: str, body: bytes) -> dict[str, Any]:
    try:
        parsed = dialects.parse(dialect, body)
    except Problem as exc:
        return {"problem": exc.code, "status": exc.status}
    return {
        "records": [
            {
                "index": r.index,
                "serial": r.serial,
                "kind": r.kind.value,
                "lot": r.lot_code,
                "plate": r.plate,
                "color": r.plate_color.value,
                "at": r.occurred_at.isoformat(),
                "vehicle_type": r.vehicle_type,
            }
            for r in parsed.records
        ],
        "rejected": [
            {"index": r.index, "serial": r.serial, "reason": r.reason.value}
            for r in parsed.rejected
        ],
    }


@pytest.mark.parametrize("case", CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden(case: Path) -> None:
    expected_file = case.with_name(case.name + ".expected.json")
    got = outcome(case.parent.name, case.read_bytes())
    if os.environ.get("CITYPARK_UPDATE_GOLDEN"):
        expected_file.write_text(json.dumps(got, ensure_ascii=False, indent=1) + "\n")
    assert got == json.loads(expected_file.read_text(encoding="utf-8"))


def test_every_dialect_has_golden_files() -> None:
    assert {p.parent.name for p in CASES} == {d.value for d in dialects.Dialect}
