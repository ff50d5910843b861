"""Passes and whitelists: the body a car park pushes, and the offline check at the exit gate.

The city decides `free` when a vehicle's passes cover every moment of its stay. Offline, the
gate knows the exit instant (and the entry only when the caller says it), so it judges what
it knows with the same rule over the passes of the last eligibility snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

PassKind = Literal["monthly", "whitelist"]
PASSES = "/v1/connector/passes"


@dataclass(frozen=True)
class PassEntry:
    """A pass of the snapshot: the vehicle is sha256("<plate>:<plate_color>")."""

    pass_id: str
    vehicle: str
    kind: str
    valid_from: datetime
    valid_to: datetime
    window: tuple[str, str] | None
    time_zone: str

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> PassEntry:
        window = raw.get("window")
        return cls(
            pass_id=str(raw["pass_id"]),
            vehicle=str(raw["vehicle"]),
            kind=str(raw["kind"]),
            valid_from=datetime.fromisoformat(str(raw["valid_from"])),
            valid_to=datetime.fromisoformat(str(raw["valid_to"])),
            window=(str(window["start"]), str(window["end"])) if window else None,
            time_zone=str(raw.get("time_zone") or "Asia/Shanghai"),
        )

    def dump(self) -> dict[str, Any]:
        return {
            "pass_id": self.pass_id,
            "vehicle": self.vehicle,
            "kind": self.kind,
            "valid_from": self.valid_from.isoformat(),
            "valid_to": self.valid_to.isoformat(),
            "window": {"start": self.window[0], "end": self.window[1]} if self.window else None,
            "time_zone": self.time_zone,
        }

    def spans(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """`[from, to)` intervals of this pass meeting `[start, end]`."""
        lo, hi = max(self.valid_from, start), min(self.valid_to, end)
        if lo > hi:
            return []
        if self.window is None:
            return [(self.valid_from, self.valid_to)]
        zone = ZoneInfo(self.time_zone)
        w_start, w_end = _clock(self.window[0]), _clock(self.window[1])
        out: list[tuple[datetime, datetime]] = []
        day = lo.astimezone(zone).date() - timedelta(days=1)  # last night may run this morning
        while day <= hi.astimezone(zone).date():
            end_day = day + timedelta(days=1) if w_end <= w_start else day
            a = max(datetime.combine(day, w_start, zone), self.valid_from)
            b = min(datetime.combine(end_day, w_end, zone), self.valid_to)
            if a < b and b > lo and a <= hi:
                out.append((a, b))
            day += timedelta(days=1)
        return out


def _clock(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


def _covers(spans: Iterable[tuple[datetime, datetime]], start: datetime, end: datetime) -> bool:
    reach = start
    for a, b in sorted(spans):
        if a > reach:
            break
        if b > reach:
            reach = b
            if reach >= end:
                return True
    return False


def covering_reason(
    passes: Iterable[PassEntry], vehicle: str, entered_at: datetime, exited_at: datetime
) -> str | None:
    """`whitelist` or `pass` when the vehicle's passes cover `[entered_at, exited_at]`."""
    start, end = entered_at.astimezone(UTC), exited_at.astimezone(UTC)
    mine = [p for p in passes if p.vehicle == vehicle]
    whitelists = [p for p in mine if p.kind == "whitelist"]
    if whitelists and _covers([s for p in whitelists for s in p.spans(start, end)], start, end):
        return "whitelist"
    if mine and _covers([s for p in mine for s in p.spans(start, end)], start, end):
        return "pass"
    return None


def _when(value: datetime | date, name: str) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{name} must be timezone-aware, or a date (a whole local day)")
        return value.isoformat()
    return value.isoformat()


def pass_body(
    *,
    plate: str,
    plate_color: str,
    kind: PassKind,
    valid_from: datetime | date,
    valid_to: datetime | date,
    window: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The PUT body of SPEC §10; `window=("21:00", "07:00")` for a night-only pass."""
    return {
        "plate": plate,
        "plate_color": plate_color,
        "kind": kind,
        "valid_from": _when(valid_from, "valid_from"),
        "valid_to": _when(valid_to, "valid_to"),
        "window": {"start": window[0], "end": window[1]} if window else None,
    }
