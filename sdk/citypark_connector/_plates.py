"""Plate keys as the city hashes them in the eligibility snapshot.

Vehicles allowed post-pay: scrypt("<plate>:<color>") with the car park's salt (`SnapshotKdf`);
the car park's own passes: sha256("<plate>:<color>") (`plate_hash`). The city normalises plates
before hashing (NFKC, upper case, no spaces or separators), so the gate must do the same or an
enrolled car typed as `苏E·12345` would be refused offline.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import asdict, dataclass

_MAXMEM = 256 * 1024 * 1024  # what a snapshot may ask of one hash (n=2**14, r=8 is 16 MiB)
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


@dataclass(frozen=True)
class SnapshotKdf:
    """How the city hashed the snapshot's vehicles for this car park (format 2): scrypt with
    the car park's own salt. Reversing the list costs the same hash per candidate plate, so a
    stolen snapshot does not give the city's drivers away."""

    salt: str  # hex
    n: int
    r: int
    p: int
    dklen: int

    @classmethod
    def parse(cls, data: dict[str, object]) -> SnapshotKdf:
        if data.get("name", "scrypt") != "scrypt":
            raise ValueError(f"unknown snapshot hash {data.get('name')!r}")
        return cls(
            salt=str(data["salt"]),
            n=int(data["n"]),  # type: ignore[call-overload]
            r=int(data["r"]),  # type: ignore[call-overload]
            p=int(data["p"]),  # type: ignore[call-overload]
            dklen=int(data["dklen"]),  # type: ignore[call-overload]
        )

    def dump(self) -> dict[str, object]:
        return {"name": "scrypt", **asdict(self)}

    def hash(self, plate: str, color: str) -> str:
        """The vehicle as the snapshot lists it (one hash: ~30 ms on a gate PC)."""
        key = f"{normalize_plate(plate)}:{normalize_color(color)}"
        return hashlib.scrypt(
            key.encode(),
            salt=bytes.fromhex(self.salt),
            n=self.n,
            r=self.r,
            p=self.p,
            maxmem=_MAXMEM,
            dklen=self.dklen,
        ).hex()
