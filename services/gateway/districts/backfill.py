"""Backfill: a district's historical records replayed through the same path as its pushes
(parse, per-record checks, dedupe by serial, publish on the district's topic), in chunks, so a
re-run changes nothing and reports every record as a duplicate."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from services.gateway.districts import service
from services.gateway.districts.registry import registry
from services.gateway.districts.schemas import DistrictBatchOut
from shared import dialects
from shared.dialects import Parsed
from shared.runtime import Runtime

CHUNK = 500


@dataclass
class Summary:
    total: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, out: DistrictBatchOut) -> None:
        self.total += out.received
        self.accepted += out.accepted
        self.duplicates += out.duplicates
        self.rejected += out.rejected
        for r in out.results:
            if r.code:
                self.reasons[r.code] = self.reasons.get(r.code, 0) + 1


def read(dialect: str, body: bytes) -> Parsed:
    """The whole file at once: a file has no batch limit, it is sent in chunks."""
    return dialects.parse(dialect, body, max_records=10**9)


def replay(
    rt: Runtime,
    district: str,
    parsed: Parsed,
    *,
    chunk: int = CHUNK,
    already_seen: Callable[[list[str]], set[str]] | None = None,
    on_chunk: Callable[[DistrictBatchOut], None] = lambda _: None,
) -> Summary:
    if registry.dialect(rt, district) is None:
        raise service.DistrictUnknown(f"No district {district!r}")
    # Chunks by position, so rejected lines are reported next to their neighbours.
    parts: dict[int, Parsed] = defaultdict(lambda: Parsed(parsed.dialect))
    for record in parsed.records:
        parts[record.index // chunk].records.append(record)
    for rejected in parsed.rejected:
        parts[rejected.index // chunk].rejected.append(rejected)
    summary = Summary()
    for key in sorted(parts):
        out = service.accept(
            rt, district, parsed.dialect.value, parts[key], backfill=True, already_seen=already_seen
        )
        summary.add(out)
        on_chunk(out)
    return summary
