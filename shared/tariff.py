"""The tariff engine of SPEC §8: one pure module for billing, quotes and the live fee.

Billing, the driver's quote and the gate's live fee must never disagree by a fen, so all three
call `quote` here and nothing else computes fees. The module does no I/O and keeps no state
beyond a cache of compiled period tables.

Semantics (SPEC §8, fixed):

1. `d = exit - entry`; if `d <= free_minutes` (+ `green_free_minutes` for green plates) the fee
   is 0, otherwise the whole stay is billed from entry.
2. Units are walked from entry. A unit belongs to the period in which it *starts*; the first
   unit of each uninterrupted stretch inside a period is the period's first block when it has
   one, else a normal unit. A unit that starts before exit is charged whole. A stretch ends
   when a unit starts in another period or in a later occurrence of the same one; a tariff
   whose single period is the whole day therefore has one stretch for the whole stay.
   Periods are read on the local clock: a boundary is the first instant the clock shows it
   (the jump itself when daylight saving skips it, its first occurrence when it repeats).
3. `cap_fen` caps the sum of the units of one stretch.
4. `daily_cap_fen` caps the sum of the units starting in each 24-hour window counted from entry
   (elapsed time, not calendar days).

Units starting inside a `free_windows` interval (passes, SPEC §10) cost 0 but stay on the unit
grid: a pass neither splits a stretch nor restarts a first block, so the bill outside the pass
is exactly what §8 says it would be.

Cap interaction: caps are applied chronologically, unit by unit, in a fixed order. Each unit's
price (0 when covered) is first cut to what is left of its stretch's `cap_fen`, and what remains
is then cut to what is left of the `daily_cap_fen` of the 24-hour window in which the unit
starts. Equivalently, the stretch cap is applied first, and the daily cap then limits the sum
of the stretch-capped amounts falling in each window. A stretch that straddles a window edge
consumes its own cap in time order, so its early units count against the earlier window, and
a unit's stretch-capped price uses up stretch cap even where the daily cap then charges 0. This
order makes the fee a running sum of non-negative unit charges, hence monotone in exit time,
never above `daily_cap_fen` per started window, and identical whether a stay is quoted live or
billed at exit. Its one surprise is kept deliberately, because it is what "covered units cost
0" means: when both caps bind, a pass over early units of a stretch leaves stretch-cap room
that the daily cap had made worthless in their window, and later units of the same stretch in
the next window may use it, so a pass can raise a fee (see the test that pins this down).

Units are counted arithmetically between boundaries (period ends, window edges, pass edges),
never minute by minute, so a week-long stay costs a few dozen steps.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, timezone, tzinfo
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any, ClassVar, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.errors import Problem, TariffInvalid
from shared.plates import PlateColor, parse_plate_color

__all__ = [
    "DEFAULT_TIME_ZONE",
    "Period",
    "Quote",
    "QuoteInputInvalid",
    "QuoteLine",
    "Tariff",
    "VehicleRates",
    "VehicleType",
    "parse_tariff",
    "quote",
]

DEFAULT_TIME_ZONE: Final[str] = "Asia/Shanghai"

_US_PER_MINUTE: Final[int] = 60_000_000
_US_PER_DAY: Final[int] = 24 * 60 * _US_PER_MINUTE
_MINUTES_PER_DAY: Final[int] = 24 * 60


class QuoteInputInvalid(Problem, ValueError):
    """Bad arguments to `quote` (naive datetimes, exit before entry, unknown vehicle type).

    A `ValueError` for plain Python callers and a 422 problem for the HTTP layer.
    """

    status: ClassVar[int] = 422
    code: ClassVar[str] = "validation_failed"
    title: ClassVar[str] = "The request body or parameters are invalid"


class VehicleType(StrEnum):
    """Vehicle class a tariff prices separately."""

    SMALL = "small"
    LARGE = "large"


Fen = Annotated[int, Field(strict=True, ge=0)]
PositiveMinutes = Annotated[int, Field(strict=True, gt=0)]
Minutes = Annotated[int, Field(strict=True, ge=0)]
ClockTime = Annotated[str, Field(strict=True, pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
EndClockTime = Annotated[str, Field(strict=True, pattern=r"^(([01]\d|2[0-3]):[0-5]\d|24:00)$")]


def _minute_of_day(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def _clock(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


class Period(BaseModel):
    """One daily time band `[start, end)` in the tariff's zone; `end <= start` wraps midnight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: ClockTime
    end: EndClockTime
    first_block_minutes: PositiveMinutes | None = None
    first_block_fen: Fen | None = None
    unit_minutes: PositiveMinutes
    unit_fen: Fen
    cap_fen: Fen | None = None

    @model_validator(mode="after")
    def _first_block_pairs(self) -> Period:
        if (self.first_block_minutes is None) != (self.first_block_fen is None):
            raise ValueError(
                f"period {self.start}-{self.end}: first_block_minutes and first_block_fen "
                "must be given together or not at all"
            )
        return self

    @property
    def start_minute(self) -> int:
        """Minutes after local midnight at which the band starts."""
        return _minute_of_day(self.start)

    @property
    def length_minutes(self) -> int:
        """Length of the band; a band whose end equals its start is the whole day."""
        length = (_minute_of_day(self.end) - self.start_minute) % _MINUTES_PER_DAY
        return length or _MINUTES_PER_DAY


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal `[from, to)` minute runs where `flags` is true, merged across midnight."""
    runs: list[tuple[int, int]] = []
    begin: int | None = None
    for minute, flag in enumerate([*flags, False]):
        if flag and begin is None:
            begin = minute
        elif not flag and begin is not None:
            runs.append((begin, minute))
            begin = None
    if len(runs) > 1 and runs[0][0] == 0 and runs[-1][1] == _MINUTES_PER_DAY:
        runs = [(runs[-1][0], runs[0][1]), *runs[1:-1]]
    return runs


class VehicleRates(BaseModel):
    """Periods of one vehicle class; they must tile the 24-hour day exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    periods: tuple[Period, ...] = Field(min_length=1)
    daily_cap_fen: Fen | None = None

    @field_validator("periods")
    @classmethod
    def _periods_tile_the_day(cls, periods: tuple[Period, ...]) -> tuple[Period, ...]:
        coverage = [0] * _MINUTES_PER_DAY
        for period in periods:
            start = period.start_minute
            for offset in range(period.length_minutes):
                coverage[(start + offset) % _MINUTES_PER_DAY] += 1
        problems = [
            f"{_clock(a)}-{_clock(b)} is not covered by any period"
            for a, b in _runs([count == 0 for count in coverage])
        ] + [
            f"{_clock(a)}-{_clock(b)} is covered by more than one period"
            for a, b in _runs([count > 1 for count in coverage])
        ]
        if problems:
            raise ValueError("periods must tile the 24-hour day exactly: " + "; ".join(problems))
        return periods


class Tariff(BaseModel):
    """A lot's tariff document (SPEC §8); the version in force is chosen by entry time.

    `rates` must price `small`; `large` may be omitted, in which case large vehicles pay the
    small rates. Refusing to bill (a session never billed) is worse than an unpriced class.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    time_zone: Annotated[str, Field(strict=True)] = DEFAULT_TIME_ZONE
    free_minutes: Minutes = 0
    rates: dict[VehicleType, VehicleRates]
    green_free_minutes: Minutes = 0

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value

    @field_validator("rates")
    @classmethod
    def _small_is_priced(
        cls, value: dict[VehicleType, VehicleRates]
    ) -> dict[VehicleType, VehicleRates]:
        if VehicleType.SMALL not in value:
            raise ValueError("rates must contain 'small'")
        return value

    @property
    def zone(self) -> ZoneInfo:
        """The zone in which periods are read."""
        return ZoneInfo(self.time_zone)

    def rates_for(self, vehicle_type: VehicleType) -> VehicleRates:
        """Rates of a vehicle class, falling back to `small` when the class is not priced."""
        return self.rates.get(vehicle_type) or self.rates[VehicleType.SMALL]


def _location(error: Mapping[str, Any]) -> str:
    return ".".join(str(part) for part in error.get("loc", ())) or "tariff"


def parse_tariff(doc: Mapping[str, Any]) -> Tariff:
    """Validate a tariff document, raising `TariffInvalid` with every problem in its detail.

    The problem also carries `errors: [{loc, msg}]` so an admin UI can point at the field.
    """
    if not isinstance(doc, Mapping):
        raise TariffInvalid(f"a tariff must be a JSON object, got {type(doc).__name__}")
    try:
        return Tariff.model_validate(dict(doc))
    except ValidationError as exc:
        errors = [
            {"loc": _location(err), "msg": str(err["msg"]).removeprefix("Value error, ")}
            for err in exc.errors(include_url=False)
        ]
        detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors)
        raise TariffInvalid(f"invalid tariff: {detail}", errors=errors) from None


class QuoteLine(BaseModel):
    """One uninterrupted stretch inside one period.

    `from`/`to` span the stretch's units in the tariff's zone; `to` is the end of the last unit,
    which may lie after the exit because a started unit is charged whole. `raw_fen` is the price
    of the uncovered units before caps, `amount_fen` what is charged after both caps; the lines'
    `amount_fen` add up to the quote's fee.
    """

    model_config = ConfigDict(frozen=True)

    period_start: str
    period_end: str
    from_: datetime = Field(
        validation_alias=AliasChoices("from", "from_"), serialization_alias="from"
    )
    to: datetime
    units: int
    covered_units: int
    first_block: bool
    raw_fen: int
    amount_fen: int
    cap_applied: bool
    daily_cap_applied: bool


class Quote(BaseModel):
    """A fee and how it was reached.

    `free_minutes_applied` means the stay was within the free minutes (no lines). `fully_covered`
    means every unit started inside a free window, the "free" gate decision of SPEC §10.
    """

    model_config = ConfigDict(frozen=True)

    fee_fen: int
    breakdown: list[QuoteLine]
    free_minutes_applied: bool
    fully_covered: bool


@dataclass(frozen=True, slots=True)
class _Slot:
    period: Period
    start_us: int
    length_us: int
    first_us: int
    first_fen: int
    unit_us: int
    unit_fen: int
    has_first_block: bool


@dataclass(frozen=True, slots=True)
class _Layout:
    slots: tuple[_Slot, ...]
    starts: tuple[int, ...]
    daily_cap_fen: int | None


@lru_cache(maxsize=512)
def _layout(rates: VehicleRates) -> _Layout:
    slots: list[_Slot] = []
    for period in sorted(rates.periods, key=lambda p: p.start_minute):
        unit_us = period.unit_minutes * _US_PER_MINUTE
        first_us, first_fen = unit_us, period.unit_fen
        if period.first_block_minutes is not None and period.first_block_fen is not None:
            first_us = period.first_block_minutes * _US_PER_MINUTE
            first_fen = period.first_block_fen
        slots.append(
            _Slot(
                period=period,
                start_us=period.start_minute * _US_PER_MINUTE,
                length_us=period.length_minutes * _US_PER_MINUTE,
                first_us=first_us,
                first_fen=first_fen,
                unit_us=unit_us,
                unit_fen=period.unit_fen,
                has_first_block=period.first_block_minutes is not None,
            )
        )
    return _Layout(
        slots=tuple(slots),
        starts=tuple(slot.start_us for slot in slots),
        daily_cap_fen=rates.daily_cap_fen,
    )


def _us(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _wall(instant: datetime, zone: tzinfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def _first_instant_at(wall: datetime, after: datetime, zone: tzinfo) -> datetime:
    """First UTC instant later than `after` at which the local clock reads `wall` or later.

    That is the wall time itself on ordinary days, its first or second occurrence in a repeated
    (fall-back) hour, and the moment of the jump when a spring-forward gap skips it.
    """
    early = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    late = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if _wall(early, zone) == wall:
        for candidate in sorted((early, late)):
            if candidate > after and _wall(candidate, zone) == wall:
                return candidate
        return after + timedelta(microseconds=1)
    lo, hi = _us(max(late, after) - after), _us(early - after)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _wall(after + timedelta(microseconds=mid), zone) >= wall:
            hi = mid
        else:
            lo = mid
    return after + timedelta(microseconds=max(hi, 1))


def _locate(layout: _Layout, instant: datetime, zone: tzinfo) -> tuple[_Slot, datetime | None]:
    """The period in force at `instant` and the instant its current occurrence ends.

    A single whole-day period never ends: its stretch is the whole stay.
    """
    local = instant.astimezone(zone)
    of_day = ((local.hour * 60 + local.minute) * 60 + local.second) * 1_000_000 + local.microsecond
    slot = layout.slots[bisect.bisect_right(layout.starts, of_day) - 1]
    if len(layout.slots) == 1 and slot.length_us == _US_PER_DAY:
        return slot, None
    day = local.date() if of_day >= slot.start_us else local.date() - timedelta(days=1)
    end_wall = datetime.combine(day, time()) + timedelta(
        microseconds=slot.start_us + slot.length_us
    )
    return slot, _first_instant_at(end_wall, instant, zone)


def _local(instant: datetime, zone: tzinfo) -> datetime:
    """`instant` in the zone's local time with a fixed offset.

    A fixed offset keeps the wall time for display but compares and hashes reliably; zone-aware
    datetimes with `fold=1` compare unequal to every other zone (PEP 495).
    """
    local = instant.astimezone(zone)
    return local.replace(tzinfo=timezone(local.utcoffset() or timedelta(0)), fold=0)


def _aware(name: str, value: object) -> datetime:
    if not isinstance(value, datetime):
        raise QuoteInputInvalid(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise QuoteInputInvalid(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def _free_intervals(
    windows: Sequence[tuple[datetime, datetime]], entry: datetime, total_us: int
) -> list[tuple[int, int]]:
    """Free windows as merged, sorted `[from, to)` offsets from entry, clipped to the stay."""
    spans: list[tuple[int, int]] = []
    for index, window in enumerate(windows):
        try:
            start, end = window
        except (TypeError, ValueError):
            raise QuoteInputInvalid(f"free_windows[{index}] must be a (start, end) pair") from None
        a = max(_us(_aware(f"free_windows[{index}] start", start) - entry), 0)
        b = min(_us(_aware(f"free_windows[{index}] end", end) - entry), total_us)
        if a < b:
            spans.append((a, b))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


class _Caps:
    """Chronological cap bookkeeping: stretch cap first, then the window's daily cap."""

    __slots__ = ("daily_cap", "spent_by_window")

    def __init__(self, daily_cap: int | None) -> None:
        self.daily_cap = daily_cap
        self.spent_by_window: dict[int, int] = {}

    def charge(self, raw: int, stretch_left: int | None, window: int) -> tuple[int, int]:
        """Charge `raw` fen; return (amount after the stretch cap, amount finally charged)."""
        after_stretch = raw if stretch_left is None else min(raw, stretch_left)
        if self.daily_cap is None:
            return after_stretch, after_stretch
        spent = self.spent_by_window.get(window, 0)
        charged = min(after_stretch, self.daily_cap - spent)
        self.spent_by_window[window] = spent + charged
        return after_stretch, charged


def _unit_cuts(rest_start: int, unit_us: int, count: int, edges: list[int]) -> list[int]:
    """Indices of the grid units `rest_start + k*unit_us` at which a boundary is crossed."""
    cuts = {0, count}
    for edge in edges:
        k = _ceil_div(edge - rest_start, unit_us)
        if 0 < k < count:
            cuts.add(k)
    return sorted(cuts)


def _covered(free: list[tuple[int, int]], offset: int) -> bool:
    index = bisect.bisect_right(free, (offset, _US_PER_DAY * 100_000)) - 1
    return index >= 0 and free[index][0] <= offset < free[index][1]


def quote(
    tariff: Tariff,
    entered_at: datetime,
    exited_at: datetime,
    vehicle_type: VehicleType | str,
    plate_color: PlateColor | str,
    *,
    free_windows: Sequence[tuple[datetime, datetime]] = (),
) -> Quote:
    """Price a stay under SPEC §8 (see the module docstring for semantics and cap order).

    `entered_at`/`exited_at` must be timezone-aware; periods are read in `tariff.time_zone`.
    `free_windows` are `[start, end)` intervals (passes) inside which units that start cost 0.
    Raises `QuoteInputInvalid` (a `ValueError`) or `PlateColorInvalid` on bad arguments.
    """
    entry = _aware("entered_at", entered_at)
    exit_ = _aware("exited_at", exited_at)
    if exit_ < entry:
        raise QuoteInputInvalid(
            f"exited_at {exited_at.isoformat()} is before entered_at {entered_at.isoformat()}"
        )
    try:
        vehicle = VehicleType(vehicle_type)
    except ValueError:
        raise QuoteInputInvalid(
            f"unknown vehicle type {vehicle_type!r}; expected small or large"
        ) from None
    color = parse_plate_color(plate_color)

    free_minutes = tariff.free_minutes
    if color is PlateColor.GREEN:
        free_minutes += tariff.green_free_minutes
    if exit_ - entry <= timedelta(minutes=free_minutes):
        return Quote(fee_fen=0, breakdown=[], free_minutes_applied=True, fully_covered=False)

    zone = tariff.zone
    layout = _layout(tariff.rates_for(vehicle))
    total = _us(exit_ - entry)
    free = _free_intervals(free_windows, entry, total)
    caps = _Caps(layout.daily_cap_fen)
    lines: list[QuoteLine] = []
    all_covered = True

    t = 0
    while t < total:
        slot, occurrence_end = _locate(layout, entry + timedelta(microseconds=t), zone)
        limit = total if occurrence_end is None else min(total, _us(occurrence_end - entry))
        rest_start = t + slot.first_us
        rest_count = _ceil_div(limit - rest_start, slot.unit_us) if rest_start < limit else 0
        stretch_end = rest_start + rest_count * slot.unit_us
        cap = slot.period.cap_fen

        segments: list[tuple[int, int, int]] = [(t, 1, slot.first_fen)]
        if rest_count:
            edges = [w for span in free for w in span if rest_start < w < stretch_end]
            edges.extend(
                day * _US_PER_DAY
                for day in range(
                    _ceil_div(rest_start + 1, _US_PER_DAY),
                    _ceil_div(stretch_end, _US_PER_DAY),
                )
            )
            cuts = _unit_cuts(rest_start, slot.unit_us, rest_count, edges)
            segments.extend(
                (rest_start + a * slot.unit_us, b - a, slot.unit_fen)
                for a, b in zip(cuts, cuts[1:], strict=False)
            )

        units = covered_units = raw_fen = stretch_fen = amount = 0
        for start, count, price in segments:
            units += count
            if _covered(free, start):
                covered_units += count
                continue
            raw = count * price
            raw_fen += raw
            after_stretch, charged = caps.charge(
                raw, None if cap is None else cap - stretch_fen, start // _US_PER_DAY
            )
            stretch_fen += after_stretch
            amount += charged
        all_covered &= covered_units == units

        lines.append(
            QuoteLine(
                period_start=slot.period.start,
                period_end=slot.period.end,
                from_=_local(entry + timedelta(microseconds=t), zone),
                to=_local(entry + timedelta(microseconds=stretch_end), zone),
                units=units,
                covered_units=covered_units,
                first_block=slot.has_first_block,
                raw_fen=raw_fen,
                amount_fen=amount,
                cap_applied=stretch_fen < raw_fen,
                daily_cap_applied=amount < stretch_fen,
            )
        )
        t = stretch_end

    return Quote(
        fee_fen=sum(line.amount_fen for line in lines),
        breakdown=lines,
        free_minutes_applied=False,
        fully_covered=all_covered and bool(lines),
    )
