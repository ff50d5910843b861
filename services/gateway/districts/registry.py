"""What the gateway needs from the lots service to read a district's body: the district's
dialect and its car parks by code. Cached briefly in the process, because a district pushes
batch after batch naming the same few hundred car parks."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from shared.errors import NotFound
from shared.runtime import Runtime

TTL_S = 10.0  # a new car park or a new district is seen within this long


@dataclass(frozen=True)
class LotRef:
    id: str
    code: str
    district: str
    operator_id: str
    postpay_enabled: bool


class Registry:
    def __init__(self, ttl_s: float = TTL_S) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._dialects: dict[str, tuple[float, str | None]] = {}
        self._lots: dict[str, tuple[float, LotRef | None]] = {}

    def dialect(self, rt: Runtime, district: str) -> str | None:
        now = time.monotonic()
        with self._lock:
            hit = self._dialects.get(district)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            found: Any = rt.internal("lots").call("GET", f"/internal/districts/{district}")
            dialect: str | None = str(found["dialect"])
        except NotFound:
            dialect = None
        with self._lock:
            self._dialects[district] = (now + self.ttl_s, dialect)
        return dialect

    def lots(self, rt: Runtime, codes: set[str]) -> dict[str, LotRef]:
        """The car parks among `codes` that exist (in any district)."""
        now = time.monotonic()
        out: dict[str, LotRef] = {}
        missing: list[str] = []
        with self._lock:
            for code in codes:
                hit = self._lots.get(code)
                if hit is not None and hit[0] > now:
                    if hit[1] is not None:
                        out[code] = hit[1]
                else:
                    missing.append(code)
        if missing:
            found: dict[str, Any] = rt.internal("lots").call(
                "POST", "/internal/districts/lots/resolve", {"codes": missing}
            )
            with self._lock:
                for code in missing:
                    ref = LotRef(**found[code]) if code in found else None
                    self._lots[code] = (now + self.ttl_s, ref)
                    if ref is not None:
                        out[code] = ref
        return out


registry = Registry()
