"""Plate keys as the city hashes them in the eligibility snapshot: sha256("<plate>:<color>").

The city normalises plates before hashing (NFKC, upper case, no spaces or separators), so the
gate must do the same or an enrolled car typed as `苏E·12345` would be refused offline.
"""

from __future__ import annotations

import hashlib
import unicodedata

_SEPARATORS = frozenset("·•‧∙・-_.–—")
_COLOR_ALIASES = {
    "蓝": "blue",
    "黄": "yellow",
    "绿": "green",
    "渐变绿": "green",
    "黄绿": "green",
    "白": "white",
    "黑": "black",
}


def normalize_plate(raw: str) -> str:
    folded = unicodedata.normalize("NFKC", raw).upper()
    return "".join(ch for ch in folded if not ch.isspace() and ch not in _SEPARATORS)


def normalize_color(raw: str) -> str:
    value = unicodedata.normalize("NFKC", raw).strip()
    return _COLOR_ALIASES.get(value, value.lower())


def plate_hash(plate: str, color: str) -> str:
    key = f"{normalize_plate(plate)}:{normalize_color(color)}"
    return hashlib.sha256(key.encode()).hexdigest()
