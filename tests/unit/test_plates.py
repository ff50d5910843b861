"""Plate normalisation, colours and masking (SPEC §3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import PlateColorInvalid, PlateInvalid
from shared.plates import PROVINCES, PlateColor, mask_plate, normalize_plate, parse_plate_color


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("苏E12345", "苏E12345"),
        ("京A8B9C7", "京A8B9C7"),
        ("粤BD12345", "粤BD12345"),
        ("沪AF12345", "沪AF12345"),
        ("冀A1234挂", "冀A1234挂"),
        ("粤Z1234港", "粤Z1234港"),
        ("粤Z1234澳", "粤Z1234澳"),
        ("鲁B1234学", "鲁B1234学"),
        ("京A1234警", "京A1234警"),
        ("沪A1234领", "沪A1234领"),
        ("使014578", "使014578"),
    ],
)
def test_valid_plates_are_kept(raw: str, expected: str) -> None:
    assert normalize_plate(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "苏E·12345",
        "苏E 12345",
        "苏E-12345",
        "苏E_12345",
        "苏E.12345",
        "苏E•12345",
        " 苏 E 1 2 3 4 5 ",
        "苏E\u300012345",
        "苏e12345",
        "苏Ｅ１２３４５",
        "苏ｅ・１２３４５",
        "苏E\t12345\n",
    ],
)
def test_spellings_normalise_to_one_plate(raw: str) -> None:
    assert normalize_plate(raw) == "苏E12345"


def test_new_energy_full_width_lowercase() -> None:
    assert normalize_plate("粤ｂ·ｄ１２３４５") == "粤BD12345"


@pytest.mark.parametrize(
    ("raw", "hint"),
    [
        ("京AO1234", "O and I"),
        ("京A1234I", "O and I"),
        ("京AD1234O", "O and I"),
        ("京OA1234", "issuing authority"),
        ("京IA1234", "issuing authority"),
        ("京11234", "issuing authority"),
        ("XA12345", "province"),
        ("AA12345", "province"),
        ("日A12345", "province"),
        ("京A1234", "too short"),
        ("京A123", "too short"),
        ("京", "too short"),
        ("京A1234567", "too long"),
        ("京A12#45", "serial"),
        ("京A12挂45", "serial"),
        ("", "empty"),
        (" · ", "empty"),
    ],
)
def test_invalid_plates_are_rejected_with_a_reason(raw: str, hint: str) -> None:
    with pytest.raises(PlateInvalid) as caught:
        normalize_plate(raw)
    assert hint in caught.value.detail
    assert caught.value.status == 422
    assert caught.value.to_dict()["code"] == "plate_invalid"


def test_non_string_is_rejected() -> None:
    with pytest.raises(PlateInvalid):
        normalize_plate(12345)  # type: ignore[arg-type]


@given(
    province=st.sampled_from(sorted(PROVINCES)),
    authority=st.sampled_from("ABCDEFGHJKLMNPQRSTUVWXYZ"),
    serial=st.text("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", min_size=5, max_size=6),
    separator=st.sampled_from(["", " ", "·", "-", "\u3000"]),
)
def test_normalisation_is_idempotent(
    province: str, authority: str, serial: str, separator: str
) -> None:
    plate = normalize_plate(f"{province}{authority.lower()}{separator}{serial}")
    assert plate == f"{province}{authority}{serial}"
    assert normalize_plate(plate) == plate


@pytest.mark.parametrize(
    ("raw", "color"),
    [
        ("blue", PlateColor.BLUE),
        ("YELLOW", PlateColor.YELLOW),
        (" green ", PlateColor.GREEN),
        ("white", PlateColor.WHITE),
        ("black", PlateColor.BLACK),
        ("蓝", PlateColor.BLUE),
        ("黄色", PlateColor.YELLOW),
        ("绿牌", PlateColor.GREEN),
        (PlateColor.WHITE, PlateColor.WHITE),
    ],
)
def test_plate_colours(raw: str, color: PlateColor) -> None:
    assert parse_plate_color(raw) is color


@pytest.mark.parametrize("raw", ["red", "", "bluee", "紫"])
def test_unknown_colour(raw: str) -> None:
    with pytest.raises(PlateColorInvalid) as caught:
        parse_plate_color(raw)
    assert caught.value.code == "plate_color_invalid"


def test_plate_color_values() -> None:
    assert [c.value for c in PlateColor] == ["blue", "yellow", "green", "white", "black"]


@pytest.mark.parametrize(
    ("plate", "masked"),
    [
        ("苏E·12345", "苏E***45"),
        ("苏E12345", "苏E***45"),
        ("粤BD12345", "粤B****45"),
        ("冀A1234挂", "冀A***4挂"),
        ("not a plate", "NO*****TE"),
        ("京A", "京*"),
        ("", ""),
    ],
)
def test_mask_plate(plate: str, masked: str) -> None:
    assert mask_plate(plate) == masked
