"""The tariff engine (SPEC §8): worked examples, validation and properties.

The worked examples are computed by hand from the §8 example tariff. The property tests also
compare the engine with `reference_fee`, a deliberately naive unit-by-unit walk of the same
rules, so the arithmetic shortcuts of the engine cannot drift from the specification.
"""

from __future__ import annotations

import copy
import json
import timeit
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared.errors import PlateColorInvalid, Problem, TariffInvalid
from shared.plates import PlateColor
from shared.tariff import (
    Period,
    Quote,
    QuoteInputInvalid,
    Tariff,
    VehicleRates,
    VehicleType,
    parse_tariff,
    quote,
)

SH = ZoneInfo("Asia/Shanghai")
NY = ZoneInfo("America/New_York")

EXAMPLE: dict[str, Any] = {
    "time_zone": "Asia/Shanghai",
    "free_minutes": 15,
    "rates": {
        "small": {
            "periods": [
                {
                    "start": "07:00",
                    "end": "21:00",
                    "first_block_minutes": 60,
                    "first_block_fen": 500,
                    "unit_minutes": 30,
                    "unit_fen": 150,
                    "cap_fen": None,
                },
                {
                    "start": "21:00",
                    "end": "07:00",
                    "unit_minutes": 120,
                    "unit_fen": 100,
                    "cap_fen": 500,
                },
            ],
            "daily_cap_fen": 3000,
        },
        "large": {
            "periods": [
                {
                    "start": "07:00",
                    "end": "21:00",
                    "first_block_minutes": 60,
                    "first_block_fen": 1000,
                    "unit_minutes": 30,
                    "unit_fen": 300,
                },
                {
                    "start": "21:00",
                    "end": "07:00",
                    "unit_minutes": 120,
                    "unit_fen": 200,
                    "cap_fen": 1000,
                },
            ],
            "daily_cap_fen": 6000,
        },
    },
    "green_free_minutes": 0,
}
TARIFF = parse_tariff(EXAMPLE)


def doc(**changes: Any) -> dict[str, Any]:
    """A deep copy of the example document with top-level keys replaced."""
    result = copy.deepcopy(EXAMPLE)
    result.update(changes)
    return result


def sh(day: int, hour: int, minute: int = 0) -> datetime:
    """A Shanghai wall time in March 2025 (Monday 3rd is a working day; no DST in China)."""
    return datetime(2025, 3, day, hour, minute, tzinfo=SH)


def fee(
    entered: datetime,
    exited: datetime,
    vehicle: str = "small",
    color: str = "blue",
    tariff: Tariff = TARIFF,
    **kwargs: Any,
) -> int:
    return quote(tariff, entered, exited, vehicle, color, **kwargs).fee_fen


# --- worked examples from the §8 tariff ------------------------------------------------------


@pytest.mark.parametrize(
    ("minutes", "expected"),
    [
        (0, 0),
        (10, 0),
        (15, 0),
        (16, 500),
        (60, 500),
        (61, 650),
        (90, 650),
        (91, 800),
        (120, 800),
        (121, 950),
    ],
)
def test_daytime_stays(minutes: int, expected: int) -> None:
    assert fee(sh(3, 10), sh(3, 10) + timedelta(minutes=minutes)) == expected


@pytest.mark.parametrize(
    ("entered", "exited", "expected"),
    [
        ((9, 0), (9, 15), 0),
        ((9, 0), (9, 16), 500),
        ((9, 0), (10, 1), 650),
        ((20, 0), (23, 30), 700),
    ],
)
def test_the_issue_worked_examples(
    entered: tuple[int, int], exited: tuple[int, int], expected: int
) -> None:
    """Entry → exit in Suzhou local time, a small car with a blue plate, the §8 tariff."""
    assert fee(sh(3, *entered), sh(3, *exited)) == expected


def test_the_evening_example_line_by_line() -> None:
    result = quote(TARIFF, sh(3, 20), sh(3, 23, 30), "small", "blue")
    assert [
        (line.period_start, line.from_, line.to, line.units, line.amount_fen, line.cap_applied)
        for line in result.breakdown
    ] == [
        ("07:00", sh(3, 20), sh(3, 21), 1, 500, False),
        ("21:00", sh(3, 21), sh(4, 1), 2, 200, False),
    ]


def test_free_minutes_are_flagged_and_leave_no_lines() -> None:
    result = quote(TARIFF, sh(3, 10), sh(3, 10, 10), "small", "blue")
    assert result == Quote(fee_fen=0, breakdown=[], free_minutes_applied=True, fully_covered=False)


def test_past_the_free_minutes_the_whole_stay_is_billed() -> None:
    result = quote(TARIFF, sh(3, 10), sh(3, 10, 16), "small", "blue")
    assert not result.free_minutes_applied
    (line,) = result.breakdown
    assert (line.units, line.first_block, line.amount_fen) == (1, True, 500)
    assert line.from_ == sh(3, 10)
    assert line.to == sh(3, 11)


def test_two_hours_in_the_day() -> None:
    result = quote(TARIFF, sh(3, 10), sh(3, 12), "small", "blue")
    assert result.fee_fen == 500 + 2 * 150
    (line,) = result.breakdown
    assert (line.period_start, line.period_end, line.units) == ("07:00", "21:00", 3)


def test_crossing_into_the_night_period() -> None:
    result = quote(TARIFF, sh(3, 20), sh(3, 22), "small", "blue")
    assert result.fee_fen == 500 + 100
    day, night = result.breakdown
    assert (day.period_start, day.units, day.amount_fen) == ("07:00", 1, 500)
    assert (night.period_start, night.units, night.amount_fen) == ("21:00", 1, 100)
    assert night.first_block is False
    assert day.to == night.from_ == sh(3, 21)
    assert night.to == sh(3, 23)


def test_a_unit_belongs_to_the_period_in_which_it_starts() -> None:
    result = quote(TARIFF, sh(3, 19, 45), sh(3, 21, 10), "small", "blue")
    assert result.fee_fen == 500 + 150
    (line,) = result.breakdown
    assert line.to == sh(3, 21, 15)


def test_the_night_starts_at_the_first_unit_after_the_boundary() -> None:
    result = quote(TARIFF, sh(3, 20, 30), sh(3, 21, 45), "small", "blue")
    assert result.fee_fen == 500 + 100
    assert result.breakdown[1].from_ == sh(3, 21, 30)


def test_a_whole_night_reaches_the_night_cap() -> None:
    assert fee(sh(3, 21), sh(4, 7)) == 500
    assert fee(sh(3, 22), sh(4, 8, 30)) == 500 + 500


def test_night_cap_cuts_a_long_night() -> None:
    tariff = parse_tariff(
        doc(
            rates={
                "small": {
                    "periods": [
                        {"start": "07:00", "end": "21:00", "unit_minutes": 60, "unit_fen": 200},
                        {
                            "start": "21:00",
                            "end": "07:00",
                            "unit_minutes": 60,
                            "unit_fen": 100,
                            "cap_fen": 500,
                        },
                    ]
                }
            }
        )
    )
    result = quote(tariff, sh(3, 21), sh(4, 7), "small", "blue")
    (line,) = result.breakdown
    assert (line.units, line.raw_fen, line.amount_fen, line.cap_applied) == (10, 1000, 500, True)
    assert fee(sh(3, 21), sh(4, 8), tariff=tariff) == 500 + 200
    assert fee(sh(3, 21), sh(5, 7), tariff=tariff) == 500 + 14 * 200 + 500


def test_thirty_hours_hit_the_daily_cap_then_continue() -> None:
    result = quote(TARIFF, sh(3, 8), sh(4, 14), "small", "blue")
    # window 1 [08:00 day 1, 08:00 day 2): 500 + 24*150 + 500 (night) + 500 (07:00 block) → 3000
    # window 2 [08:00 day 2, 14:00 day 2): 12 units of 150
    assert result.fee_fen == 3000 + 1800
    day1, night, day2 = result.breakdown
    assert (day1.raw_fen, day1.amount_fen, day1.daily_cap_applied) == (4100, 3000, True)
    assert (night.raw_fen, night.amount_fen, night.daily_cap_applied) == (500, 0, True)
    assert (day2.units, day2.raw_fen, day2.amount_fen) == (13, 2300, 1800)
    assert sum(line.amount_fen for line in result.breakdown) == result.fee_fen


def test_two_full_windows_cost_two_daily_caps() -> None:
    assert fee(sh(3, 8), sh(5, 8)) == 2 * 3000
    assert fee(sh(3, 8), sh(5, 8, 1)) == 2 * 3000 + 150


def test_green_free_minutes() -> None:
    tariff = parse_tariff(doc(green_free_minutes=15))
    assert fee(sh(3, 10), sh(3, 10, 25), color="green", tariff=tariff) == 0
    assert fee(sh(3, 10), sh(3, 10, 30), color="green", tariff=tariff) == 0
    assert fee(sh(3, 10), sh(3, 10, 31), color="green", tariff=tariff) == 500
    assert fee(sh(3, 10), sh(3, 10, 25), color="blue", tariff=tariff) == 500
    assert fee(sh(3, 10), sh(3, 11, 1), color="green", tariff=tariff) == 650


def test_large_vehicles() -> None:
    assert fee(sh(3, 10), sh(3, 10, 15), "large") == 0
    assert fee(sh(3, 10), sh(3, 11, 1), "large") == 1000 + 300
    assert fee(sh(3, 20), sh(3, 22), VehicleType.LARGE) == 1000 + 200
    assert fee(sh(3, 21), sh(4, 7), "large") == 1000
    assert fee(sh(3, 8), sh(4, 8), "large") == 6000


def test_large_vehicles_pay_small_rates_when_the_tariff_has_none() -> None:
    tariff = parse_tariff(doc(rates={"small": EXAMPLE["rates"]["small"]}))
    assert fee(sh(3, 10), sh(3, 11, 1), "large", tariff=tariff) == 650


def test_stretch_cap_is_applied_before_the_daily_cap() -> None:
    tariff = parse_tariff(
        doc(
            free_minutes=0,
            rates={
                "small": {
                    "periods": [
                        {
                            "start": "08:00",
                            "end": "20:00",
                            "unit_minutes": 60,
                            "unit_fen": 100,
                            "cap_fen": 800,
                        },
                        {"start": "20:00", "end": "08:00", "unit_minutes": 60, "unit_fen": 100},
                    ],
                    "daily_cap_fen": 1500,
                }
            },
        )
    )
    result = quote(tariff, sh(3, 14), sh(4, 20), "small", "blue")
    day1, night, day2 = result.breakdown
    # window 1 [14:00, 14:00): day 1 600 + night 1200 + day 2 08:00-14:00 600 (under its cap)
    # → daily cap 1500. Window 2: day 2 14:00-20:00 raw 600, but its stretch already used 600
    # of 800, so 200 remain.
    assert (day1.amount_fen, night.amount_fen, day2.amount_fen) == (600, 900, 200)
    assert (day2.raw_fen, day2.cap_applied, day2.daily_cap_applied) == (1200, True, True)
    assert result.fee_fen == 1700


def test_a_pass_can_move_stretch_cap_room_to_a_later_day() -> None:
    """The literal reading of §8 + §10 with both caps binding, kept on purpose.

    Covered units cost 0, so they use none of their stretch's cap; when the daily cap had
    already swallowed those units' price, the unused stretch-cap room pays for later units of
    the same stretch in the next 24-hour window. Here a pass over the first hour raises the fee
    from 100 to 150.
    """
    tariff = parse_tariff(
        {
            "free_minutes": 0,
            "rates": {
                "small": {
                    "periods": [
                        {
                            "start": "00:00",
                            "end": "00:00",
                            "unit_minutes": 60,
                            "unit_fen": 50,
                            "cap_fen": 1200,
                        }
                    ],
                    "daily_cap_fen": 100,
                }
            },
        }
    )
    entered, exited = sh(3, 0), sh(4, 2)
    assert fee(entered, exited, tariff=tariff) == 100 + 0
    assert fee(entered, exited, tariff=tariff, free_windows=[(sh(3, 0), sh(3, 1))]) == 100 + 50


def test_a_pass_window_makes_its_units_free() -> None:
    night = [(sh(3, 21), sh(4, 7))]
    result = quote(TARIFF, sh(3, 20), sh(4, 8), "small", "blue", free_windows=night)
    assert result.fee_fen == 500 + 500
    assert [(line.units, line.covered_units) for line in result.breakdown] == [
        (1, 0),
        (5, 5),
        (1, 0),
    ]
    assert not result.fully_covered


def test_a_pass_does_not_restart_the_first_block() -> None:
    lunch = [(sh(3, 11), sh(3, 12))]
    assert fee(sh(3, 10), sh(3, 13), free_windows=lunch) == 500 + 2 * 150


def test_a_fully_covered_stay() -> None:
    result = quote(
        TARIFF, sh(3, 10), sh(5, 10), "small", "blue", free_windows=[(sh(1, 0), sh(9, 0))]
    )
    assert (result.fee_fen, result.fully_covered) == (0, True)
    assert result.breakdown


def test_windows_may_overlap_and_be_given_in_any_zone() -> None:
    windows = [
        (sh(3, 12).astimezone(UTC), sh(3, 13).astimezone(UTC)),
        (sh(3, 11), sh(3, 12, 30)),
    ]
    assert fee(sh(3, 10), sh(3, 14), free_windows=windows) == 500 + 2 * 150


def test_datetimes_in_other_zones_are_read_in_the_tariff_zone() -> None:
    entered = sh(3, 20).astimezone(UTC)
    assert fee(entered, entered + timedelta(hours=2)) == 600


def test_daylight_saving_spring_forward() -> None:
    tariff = parse_tariff(doc(time_zone="America/New_York"))
    entered = datetime(2025, 3, 8, 20, 0, tzinfo=NY)
    exited = datetime(2025, 3, 9, 9, 0, tzinfo=NY)
    result = quote(tariff, entered, exited, "small", "blue")
    assert result.fee_fen == 500 + 500 + 500
    assert result.breakdown[2].from_ == datetime(2025, 3, 9, 8, 0, tzinfo=NY)


def test_daylight_saving_boundary_inside_the_gap() -> None:
    rates = {
        "periods": [
            {"start": "02:30", "end": "12:00", "unit_minutes": 60, "unit_fen": 200},
            {"start": "12:00", "end": "02:30", "unit_minutes": 60, "unit_fen": 100},
        ]
    }
    tariff = parse_tariff({"time_zone": "America/New_York", "rates": {"small": rates}})
    entered = datetime(2025, 3, 9, 5, 0, tzinfo=UTC)
    result = quote(tariff, entered, entered + timedelta(hours=3), "small", "blue")
    assert [(line.period_start, line.units) for line in result.breakdown] == [
        ("12:00", 2),
        ("02:30", 1),
    ]
    assert result.fee_fen == 400


def test_daylight_saving_fall_back() -> None:
    rates = {
        "periods": [
            {"start": "01:30", "end": "12:00", "unit_minutes": 30, "unit_fen": 200},
            {"start": "12:00", "end": "01:30", "unit_minutes": 30, "unit_fen": 100},
        ]
    }
    tariff = parse_tariff({"time_zone": "America/New_York", "rates": {"small": rates}})
    entered = datetime(2025, 11, 2, 4, 0, tzinfo=UTC)
    result = quote(tariff, entered, entered + timedelta(hours=3), "small", "blue")
    assert [(line.period_start, line.units) for line in result.breakdown] == [
        ("12:00", 3),
        ("01:30", 3),
    ]


def test_a_single_whole_day_period_is_one_stretch() -> None:
    rates = {
        "periods": [
            {
                "start": "00:00",
                "end": "00:00",
                "first_block_minutes": 60,
                "first_block_fen": 300,
                "unit_minutes": 60,
                "unit_fen": 100,
                "cap_fen": 2000,
            }
        ]
    }
    tariff = parse_tariff({"rates": {"small": rates}})
    result = quote(tariff, sh(3, 22), sh(4, 2), "small", "blue")
    assert len(result.breakdown) == 1
    assert result.fee_fen == 300 + 3 * 100
    assert fee(sh(3, 22), sh(6, 2), tariff=tariff) == 2000


def test_quote_serialises_from_as_from() -> None:
    result = quote(TARIFF, sh(3, 10), sh(3, 12), "small", "blue")
    body = json.loads(result.model_dump_json(by_alias=True))
    line = body["breakdown"][0]
    assert line["from"] == "2025-03-03T10:00:00+08:00"
    assert line["to"] == "2025-03-03T12:00:00+08:00"
    assert body["fee_fen"] == 800


def test_a_week_quotes_fast() -> None:
    entered = sh(3, 9, 17)
    exited = entered + timedelta(days=7, minutes=3)
    runs = 20
    best = min(
        timeit.repeat(
            lambda: quote(TARIFF, entered, exited, "small", "blue"), number=runs, repeat=5
        )
    )
    assert best / runs < 0.001


def test_a_year_of_one_minute_units_is_still_cheap() -> None:
    rates = {"periods": [{"start": "00:00", "end": "00:00", "unit_minutes": 1, "unit_fen": 1}]}
    tariff = parse_tariff({"rates": {"small": rates}, "free_minutes": 0})
    entered = sh(3, 0)
    assert fee(entered, entered + timedelta(days=365), tariff=tariff) == 365 * 24 * 60


# --- argument errors ---------------------------------------------------------------------------


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(QuoteInputInvalid) as caught:
        quote(TARIFF, datetime(2025, 3, 3, 10), sh(3, 12), "small", "blue")
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, Problem)
    assert caught.value.status == 422
    assert "timezone-aware" in caught.value.detail
    with pytest.raises(ValueError, match="exited_at"):
        quote(TARIFF, sh(3, 10), datetime(2025, 3, 3, 12), "small", "blue")
    with pytest.raises(ValueError, match="free_windows"):
        quote(
            TARIFF,
            sh(3, 10),
            sh(3, 12),
            "small",
            "blue",
            free_windows=[(datetime(2025, 3, 3, 11), sh(3, 12))],
        )


def test_exit_before_entry_is_refused() -> None:
    with pytest.raises(QuoteInputInvalid, match="before"):
        quote(TARIFF, sh(3, 12), sh(3, 10), "small", "blue")


def test_unknown_vehicle_type_and_colour() -> None:
    with pytest.raises(QuoteInputInvalid, match="vehicle type"):
        quote(TARIFF, sh(3, 10), sh(3, 12), "bus", "blue")
    with pytest.raises(PlateColorInvalid):
        quote(TARIFF, sh(3, 10), sh(3, 12), "small", "purple")


# --- tariff validation -------------------------------------------------------------------------


def small_periods(*periods: dict[str, Any]) -> dict[str, Any]:
    return doc(rates={"small": {"periods": list(periods)}})


DAY = {"start": "07:00", "end": "21:00", "unit_minutes": 30, "unit_fen": 150}
NIGHT = {"start": "21:00", "end": "07:00", "unit_minutes": 120, "unit_fen": 100}


def invalid(document: Any) -> Problem:
    with pytest.raises(TariffInvalid) as caught:
        parse_tariff(document)
    assert caught.value.status == 422
    assert caught.value.to_dict()["code"] == "tariff_invalid"
    return caught.value


def test_the_example_tariff_parses() -> None:
    assert TARIFF.free_minutes == 15
    assert TARIFF.rates[VehicleType.SMALL].daily_cap_fen == 3000
    assert TARIFF.rates[VehicleType.SMALL].periods[1].cap_fen == 500
    assert isinstance(TARIFF.rates[VehicleType.LARGE], VehicleRates)
    assert isinstance(TARIFF.rates[VehicleType.SMALL].periods[0], Period)


def test_gap_between_periods() -> None:
    error = invalid(small_periods({**DAY, "end": "20:00"}, NIGHT))
    assert "20:00-21:00 is not covered" in error.detail
    assert error.to_dict()["errors"][0]["loc"] == "rates.small.periods"


def test_overlapping_periods() -> None:
    error = invalid(small_periods({**DAY, "end": "22:00"}, NIGHT))
    assert "21:00-22:00 is covered by more than one period" in error.detail


def test_gap_across_midnight_is_reported_once() -> None:
    error = invalid(small_periods({**DAY, "start": "01:00", "end": "23:00"}))
    assert "23:00-01:00 is not covered" in error.detail


def test_periods_may_come_in_any_order_and_end_at_24_00() -> None:
    tariff = parse_tariff(
        small_periods(
            {**NIGHT, "start": "00:00", "end": "07:00"},
            DAY,
            {**NIGHT, "start": "21:00", "end": "24:00"},
        )
    )
    assert len(tariff.rates[VehicleType.SMALL].periods) == 3
    invalid(small_periods({**DAY, "end": "24:00"}, {**NIGHT, "start": "24:00"}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("unit_fen", 1.5),
        ("unit_fen", 150.0),
        ("unit_fen", "150"),
        ("unit_fen", True),
        ("unit_fen", -1),
        ("unit_minutes", 0),
        ("unit_minutes", 30.0),
        ("cap_fen", 99.9),
        ("start", "7:00"),
        ("start", "25:00"),
        ("start", "07:60"),
        ("start", 700),
        ("unknown_field", 1),
    ],
)
def test_bad_period_fields(field: str, value: Any) -> None:
    error = invalid(small_periods({**DAY, field: value}, NIGHT))
    assert "rates.small.periods.0" in error.detail


def test_float_daily_cap_and_free_minutes() -> None:
    invalid(doc(free_minutes=15.0))
    bad = copy.deepcopy(EXAMPLE)
    bad["rates"]["small"]["daily_cap_fen"] = 3000.0
    assert "daily_cap_fen" in invalid(bad).detail


def test_first_block_both_or_neither() -> None:
    error = invalid(small_periods({**DAY, "first_block_minutes": 60}, NIGHT))
    assert "first_block_minutes and first_block_fen" in error.detail
    invalid(small_periods({**DAY, "first_block_fen": 500}, NIGHT))
    invalid(small_periods({**DAY, "first_block_minutes": 0, "first_block_fen": 500}, NIGHT))


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "", "../etc/passwd", "Asia/Shanghai "])
def test_bad_time_zone(zone: str) -> None:
    assert "time zone" in invalid(doc(time_zone=zone)).detail


def test_time_zone_defaults_to_shanghai() -> None:
    document = doc()
    del document["time_zone"]
    assert parse_tariff(document).time_zone == "Asia/Shanghai"


def test_structural_errors() -> None:
    invalid([])
    invalid(doc(rates={}))
    invalid(doc(rates={"medium": EXAMPLE["rates"]["small"]}))
    invalid(doc(rates={"large": EXAMPLE["rates"]["small"]}))
    invalid(small_periods())
    invalid(doc(free_minutes=-1))
    invalid(doc(typo_field=1))


def test_tariffs_are_immutable() -> None:
    with pytest.raises(ValueError, match="frozen"):
        TARIFF.free_minutes = 0


# --- properties ---------------------------------------------------------------------------------

BASE = datetime(2025, 1, 1, tzinfo=UTC)
TRANSITIONS = [
    datetime(2025, 3, 9, 7, tzinfo=UTC),
    datetime(2025, 11, 2, 6, tzinfo=UTC),
    datetime(2025, 3, 30, 1, tzinfo=UTC),
    datetime(2025, 10, 26, 1, tzinfo=UTC),
    datetime(2025, 4, 5, 15, tzinfo=UTC),
]


@st.composite
def period_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    starts = sorted(draw(st.sets(st.integers(0, 24 * 60 - 1), min_size=1, max_size=4).map(sorted)))
    periods: list[dict[str, Any]] = []
    for index, start in enumerate(starts):
        end = starts[(index + 1) % len(starts)]
        period: dict[str, Any] = {
            "start": f"{start // 60:02d}:{start % 60:02d}",
            "end": f"{end // 60:02d}:{end % 60:02d}",
            "unit_minutes": draw(st.integers(1, 180)),
            "unit_fen": draw(st.integers(0, 500)),
            "cap_fen": draw(st.none() | st.integers(0, 3000)),
        }
        if draw(st.booleans()):
            period["first_block_minutes"] = draw(st.integers(1, 240))
            period["first_block_fen"] = draw(st.integers(0, 1000))
        periods.append(period)
    return draw(st.permutations(periods))


@st.composite
def tariffs(draw: st.DrawFn, zones: list[str]) -> Tariff:
    return parse_tariff(
        {
            "time_zone": draw(st.sampled_from(zones)),
            "free_minutes": draw(st.integers(0, 30)),
            "green_free_minutes": draw(st.integers(0, 30)),
            "rates": {
                "small": {
                    "periods": draw(period_sets()),
                    "daily_cap_fen": draw(st.none() | st.integers(0, 10_000)),
                }
            },
        }
    )


FIXED_ZONES = ["Asia/Shanghai", "UTC", "Asia/Kolkata"]
ALL_ZONES = [*FIXED_ZONES, "America/New_York", "Europe/London", "Australia/Lord_Howe"]

entries = st.builds(
    lambda base, offset: base + timedelta(microseconds=offset),
    st.sampled_from([BASE, *TRANSITIONS]),
    st.integers(-3 * 86_400_000_000, 3 * 86_400_000_000),
)
durations = st.integers(0, 4 * 86_400).map(lambda s: timedelta(seconds=s))
colors = st.sampled_from(list(PlateColor))


@st.composite
def windows(draw: st.DrawFn, entered: datetime) -> list[tuple[datetime, datetime]]:
    result = []
    for _ in range(draw(st.integers(0, 3))):
        start = entered + timedelta(minutes=draw(st.integers(-600, 5000)))
        result.append((start, start + timedelta(minutes=draw(st.integers(0, 2000)))))
    return result


def reference_fee(
    tariff: Tariff,
    entered: datetime,
    exited: datetime,
    color: PlateColor,
    free_windows: list[tuple[datetime, datetime]],
) -> int:
    """§8 read literally: one unit at a time. Only for zones without daylight saving."""
    free = tariff.free_minutes + (tariff.green_free_minutes if color is PlateColor.GREEN else 0)
    if exited - entered <= timedelta(minutes=free):
        return 0
    rates = tariff.rates_for(VehicleType.SMALL)
    zone = ZoneInfo(tariff.time_zone)
    whole_day = len(rates.periods) == 1

    def period_at(instant: datetime) -> tuple[Period, object]:
        local = instant.astimezone(zone)
        minute = local.hour * 60 + local.minute + (local.second + local.microsecond / 1e6) / 60
        for period in rates.periods:
            since_start = (minute - period.start_minute) % (24 * 60)
            if since_start < period.length_minutes:
                started = local.date() if minute >= period.start_minute else None
                if started is None:
                    started = local.date() - timedelta(days=1)
                return period, ("whole" if whole_day else (period.start, started))
        raise AssertionError("periods do not tile the day")

    total = 0
    stretch_key: object = None
    stretch_spent = 0
    window_spent: dict[int, int] = {}
    at = entered
    while at < exited:
        period, key = period_at(at)
        first = key != stretch_key
        if first:
            stretch_key, stretch_spent = key, 0
        if first and period.first_block_minutes is not None:
            length, price = period.first_block_minutes, period.first_block_fen or 0
        else:
            length, price = period.unit_minutes, period.unit_fen
        if any(a <= at < b for a, b in free_windows):
            price = 0
        if period.cap_fen is not None:
            price = min(price, period.cap_fen - stretch_spent)
        stretch_spent += price
        if rates.daily_cap_fen is not None:
            window = (at - entered) // timedelta(days=1)
            price = min(price, rates.daily_cap_fen - window_spent.get(window, 0))
            window_spent[window] = window_spent.get(window, 0) + price
        total += price
        at += timedelta(minutes=length)
    return total


SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(data=st.data(), tariff=tariffs(FIXED_ZONES), duration=durations, color=colors)
def test_engine_matches_the_literal_reading(
    data: st.DataObject, tariff: Tariff, duration: timedelta, color: PlateColor
) -> None:
    entered = data.draw(entries)
    free_windows = data.draw(windows(entered))
    exited = entered + duration
    result = quote(tariff, entered, exited, "small", color, free_windows=free_windows)
    assert result.fee_fen == reference_fee(tariff, entered, exited, color, free_windows)


@SLOW
@given(
    data=st.data(),
    tariff=tariffs(ALL_ZONES),
    duration=durations,
    extra=durations,
    color=colors,
)
def test_fee_properties(
    data: st.DataObject, tariff: Tariff, duration: timedelta, extra: timedelta, color: PlateColor
) -> None:
    entered = data.draw(entries)
    exited = entered + duration
    result = quote(tariff, entered, exited, "small", color)
    later = quote(tariff, entered, exited + extra, "small", color)

    assert type(result.fee_fen) is int
    assert result.fee_fen >= 0
    assert result.fee_fen <= later.fee_fen
    assert result.fee_fen == sum(line.amount_fen for line in result.breakdown)
    assert all(line.amount_fen <= line.raw_fen for line in result.breakdown)
    for before, after in zip(result.breakdown, result.breakdown[1:], strict=False):
        assert before.to == after.from_
    if result.breakdown:
        assert result.breakdown[0].from_ == entered
        assert result.breakdown[-1].to >= exited
    daily_cap = tariff.rates[VehicleType.SMALL].daily_cap_fen
    if daily_cap is not None:
        started_windows = -(-duration // timedelta(days=1))
        assert result.fee_fen <= daily_cap * started_windows


@SLOW
@given(data=st.data(), tariff=tariffs(ALL_ZONES), duration=durations)
def test_free_windows_never_raise_the_fee(
    data: st.DataObject, tariff: Tariff, duration: timedelta
) -> None:
    """Holds unless both caps bind; see `test_a_pass_can_move_stretch_cap_room_to_a_later_day`."""
    rates = tariff.rates[VehicleType.SMALL]
    assume(rates.daily_cap_fen is None or all(p.cap_fen is None for p in rates.periods))
    entered = data.draw(entries)
    assume(duration > timedelta(0))
    free_windows = data.draw(windows(entered))
    plain = quote(tariff, entered, entered + duration, "small", "blue")
    with_pass = quote(
        tariff, entered, entered + duration, "small", "blue", free_windows=free_windows
    )
    assert with_pass.fee_fen <= plain.fee_fen
    assert [line.units for line in with_pass.breakdown] == [line.units for line in plain.breakdown]


@SLOW
@given(data=st.data(), tariff=tariffs(ALL_ZONES), color=colors)
def test_free_inside_the_free_minutes(
    data: st.DataObject, tariff: Tariff, color: PlateColor
) -> None:
    free = tariff.free_minutes + (tariff.green_free_minutes if color is PlateColor.GREEN else 0)
    entered = data.draw(entries)
    inside = data.draw(st.integers(0, free * 60_000_000))
    result = quote(tariff, entered, entered + timedelta(microseconds=inside), "small", color)
    assert (result.fee_fen, result.breakdown, result.free_minutes_applied) == (0, [], True)


@SLOW
@given(
    data=st.data(),
    tariff=tariffs(ALL_ZONES),
    duration=durations,
    cut=st.floats(0, 1),
    color=colors,
)
def test_splitting_never_changes_a_quotes_sum(
    data: st.DataObject, tariff: Tariff, duration: timedelta, cut: float, color: PlateColor
) -> None:
    """However a stay's bill is split, the parts add up to the quote.

    Split into its lines (stretches), the amounts add up to the fee; split in time at any
    instant, the quote up to then (the live `fee_so_far_fen`) is the final bill's lines up to
    then: every line but the last of the shorter quote reappears unchanged, so what a driver
    saw while parked is part of what they are charged, and the rest is the lines added after.
    """
    entered = data.draw(entries)
    exited = entered + duration
    split = entered + duration * cut
    whole = quote(tariff, entered, exited, "small", color)
    part = quote(tariff, entered, split, "small", color)

    assert whole.fee_fen == sum(line.amount_fen for line in whole.breakdown)
    assert part.fee_fen == sum(line.amount_fen for line in part.breakdown)
    if part.free_minutes_applied:
        return
    settled = part.breakdown[:-1]
    assert whole.breakdown[: len(settled)] == settled
    last, grown = part.breakdown[-1], whole.breakdown[len(settled)]
    assert (last.period_start, last.from_) == (grown.period_start, grown.from_)
    assert grown.units >= last.units
    assert grown.amount_fen >= last.amount_fen
    assert (
        whole.fee_fen - part.fee_fen
        == sum(line.amount_fen for line in whole.breakdown[len(settled) :]) - last.amount_fen
    )
