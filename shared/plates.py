"""Licence plates: normalisation, validation, colours and masking (SPEC §3).

A vehicle is identified by `(plate, plate_color)`. Connectors, district adapters and drivers type
plates in many ways (full-width characters from Chinese IMEs, `苏E·12345`, lower case), so every
plate goes through `normalize_plate` before it is stored, compared or looked up; otherwise the
same car would open two sessions or escape its own arrears.
"""

from __future__ import annotations

import re
import unicodedata
from enum import StrEnum
from typing import Final

from shared.errors import PlateColorInvalid, PlateInvalid

__all__ = [
    "PROVINCES",
    "PlateColor",
    "mask_plate",
    "normalize_plate",
    "parse_plate_color",
]


class PlateColor(StrEnum):
    """Plate background colour; green is new-energy (new-energy plates have a 6-char serial)."""

    BLUE = "blue"
    YELLOW = "yellow"
    GREEN = "green"
    WHITE = "white"
    BLACK = "black"


PROVINCES: Final[frozenset[str]] = frozenset(
    "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
)
"""Province abbreviations that open an ordinary civilian plate."""

_SEPARATORS: Final[frozenset[str]] = frozenset("·•‧∙・-_.–—")
_SERIAL_CHARS: Final[str] = "A-HJ-NP-Z0-9"
_SPECIAL_SUFFIXES: Final[str] = "挂学警港澳领"
_AUTHORITY: Final[re.Pattern[str]] = re.compile("[A-HJ-NP-Z]")
_ORDINARY: Final[re.Pattern[str]] = re.compile(
    f"[{_SERIAL_CHARS}]{{5}}|[{_SERIAL_CHARS}]{{4}}[{_SPECIAL_SUFFIXES}]"
)
_NEW_ENERGY: Final[re.Pattern[str]] = re.compile(f"[{_SERIAL_CHARS}]{{6}}")
_EMBASSY: Final[re.Pattern[str]] = re.compile("使[0-9]{6}")

_COLOR_ALIASES: Final[dict[str, PlateColor]] = {
    "蓝": PlateColor.BLUE,
    "黄": PlateColor.YELLOW,
    "绿": PlateColor.GREEN,
    "渐变绿": PlateColor.GREEN,
    "黄绿": PlateColor.GREEN,
    "白": PlateColor.WHITE,
    "黑": PlateColor.BLACK,
}


def _clean(raw: str) -> str:
    """NFKC folds full-width letters, digits and the ideographic space to their ASCII forms."""
    folded = unicodedata.normalize("NFKC", raw).upper()
    return "".join(ch for ch in folded if not ch.isspace() and ch not in _SEPARATORS)


def _serial_problem(plate: str, serial: str) -> str:
    """Name the first concrete reason a serial fails, so the caller can fix the input."""
    if "O" in serial or "I" in serial:
        return f"plate {plate!r}: letters O and I are not used in plate serials (use 0 and 1)"
    expected = "expected 5 (6 for new-energy plates)"
    if len(serial) < 5:
        return (
            f"plate {plate!r} is too short: the serial after the issuing letter has "
            f"{len(serial)} characters, {expected}"
        )
    if len(serial) > 6:
        return (
            f"plate {plate!r} is too long: the serial after the issuing letter has "
            f"{len(serial)} characters, {expected}"
        )
    return (
        f"plate {plate!r}: the serial {serial!r} may only hold letters A-Z (not O/I) and "
        f"digits, optionally ending in one of {_SPECIAL_SUFFIXES}"
    )


def normalize_plate(raw: str) -> str:
    """Return the canonical form of a Chinese plate or raise `PlateInvalid`.

    Canonical means upper case, half-width, without spaces or separators: `苏e·１２３４５` and
    `苏E 12345` are both `苏E12345`. Accepted shapes: province + issuing letter + 5-char serial
    (the last char may be 挂/学/警/港/澳/领), province + issuing letter + 6-char new-energy
    serial, and embassy plates `使` + 6 digits. Letters I and O are refused everywhere after the
    province because they are never issued (they read as 1 and 0).
    """
    if not isinstance(raw, str):
        raise PlateInvalid(f"a plate must be a string, got {type(raw).__name__}")
    plate = _clean(raw)
    if not plate:
        raise PlateInvalid("the plate is empty")
    if _EMBASSY.fullmatch(plate):
        return plate
    province = plate[0]
    if province not in PROVINCES:
        raise PlateInvalid(
            f"plate {plate!r} does not start with a province abbreviation (e.g. 京, 沪, 粤)"
        )
    if len(plate) < 2:
        raise PlateInvalid(f"plate {plate!r} is too short: the issuing letter is missing")
    authority = plate[1]
    if not _AUTHORITY.fullmatch(authority):
        raise PlateInvalid(
            f"plate {plate!r}: the issuing authority must be a letter A-Z other than I and O, "
            f"got {authority!r}"
        )
    serial = plate[2:]
    if _ORDINARY.fullmatch(serial) or _NEW_ENERGY.fullmatch(serial):
        return plate
    raise PlateInvalid(_serial_problem(plate, serial))


def parse_plate_color(raw: str) -> PlateColor:
    """Parse a colour name (`blue`, `BLUE`, `蓝`, `蓝色`, `蓝牌`) or raise `PlateColorInvalid`."""
    if isinstance(raw, PlateColor):
        return raw
    if not isinstance(raw, str):
        raise PlateColorInvalid(f"a plate colour must be a string, got {type(raw).__name__}")
    key = unicodedata.normalize("NFKC", raw).strip().lower()
    try:
        return PlateColor(key)
    except ValueError:
        pass
    stem = key.removesuffix("牌").removesuffix("色")
    if stem in _COLOR_ALIASES:
        return _COLOR_ALIASES[stem]
    allowed = ", ".join(c.value for c in PlateColor)
    raise PlateColorInvalid(f"unknown plate colour {raw!r}; expected one of {allowed}")


def mask_plate(plate: str) -> str:
    """Hide the middle of a plate for messages and logs: `苏E·12345` → `苏E***45`.

    Province, issuing letter and the last two characters stay so a driver with several cars can
    still tell which one a message is about. Masking never fails: it is used on the way out
    (notifications, logs), where an odd stored plate must not turn into an error.
    """
    try:
        clean = normalize_plate(plate)
    except PlateInvalid:
        clean = _clean(plate) if isinstance(plate, str) else ""
    if len(clean) <= 4:
        return clean[:1] + "*" * (len(clean) - 1)
    return clean[:2] + "*" * (len(clean) - 4) + clean[-2:]


def mask_plate_for_message(plate: str) -> str:
    """The masked plate drivers read in notifications and on invoices: `苏E12345` → `苏E·12*45`.

    The familiar dot after the issuing letter is kept, as on the plate itself; the middle of the
    serial is hidden, its first two and last two characters shown. Never fails (see mask_plate).
    """
    try:
        clean = normalize_plate(plate)
    except PlateInvalid:
        clean = _clean(plate) if isinstance(plate, str) else ""
    if len(clean) < 7 or clean[0] not in PROVINCES:
        return mask_plate(clean)
    serial = clean[2:]
    return f"{clean[:2]}·{serial[:2]}{'*' * (len(serial) - 4)}{serial[-2:]}"
