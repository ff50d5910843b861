"""Who may learn a plate's passes through a quote.

A quote without a plate is the tariff alone and open to anyone. With a plate it would tell
where that plate holds a pass, so it needs a caller entitled to know: the driver who holds
the plate verified (their own bearer token; billing says which plates those are), or the car
park itself (its connector signature, RFC 9421, for its own car park). Anyone else asking
about a plate gets 401 `auth_required`; a driver asking about a plate that is not theirs, or a
car park about another car park, gets the price as if the plate held no pass there, so the
answer never tells whether it does.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from services.lots.models import LotKey
from shared.auth import authenticate_driver
from shared.errors import KeyUnknown, NonceReused, NotFound, problem
from shared.plates import normalize_plate, parse_plate_color
from shared.runtime import Runtime
from shared.signatures import load_public_key, verify_request

AuthRequired = problem(
    401, "auth_required", "A quote for a plate needs the driver's token or the car park's signature"
)
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class QuoteCaller:
    driver_id: str | None = None
    lot_id: str | None = None  # the car park whose key signed the request


def _verify_lot(rt: Runtime, method: str, url: str, headers: dict[str, str], body: bytes) -> str:
    found: dict[str, str] = {}

    def resolve(key_id: str) -> Any:
        if not KEY_ID.fullmatch(key_id):
            raise KeyUnknown("No key is registered under this keyid")
        with rt.read_sessionmaker() as db:
            row = db.get(LotKey, key_id)
            if row is None or row.revoked_at is not None:
                return None
            found[key_id] = row.lot_id
            return load_public_key(row.public_key_pem)

    verified = verify_request(
        method=method,
        url=url,
        headers=headers,
        body=body,
        resolve_key=resolve,
        now=time.time(),
        max_skew_s=rt.settings.signature_max_skew_s,
    )
    window = 2 * rt.settings.signature_max_skew_s + 60
    nonce = f"citypark:lots:quote-nonce:{verified.key_id}:{verified.nonce}"
    if not rt.redis.set(nonce, 1, nx=True, ex=window):
        raise NonceReused("This signature was already used; sign every request afresh")
    return found[verified.key_id]


def _names_plate(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False  # not JSON: validation answers it
    return isinstance(data, dict) and data.get("plate") is not None


async def quote_caller(request: Request) -> QuoteCaller:
    """The driver or car park behind a quote request; anonymous when neither is claimed.

    Credentials are judged only when the quote names a plate: without one the quote is open
    to anyone, whatever token a caller happens to send along."""
    if not _names_plate(await request.body()):
        return QuoteCaller()
    if "signature-input" in request.headers:
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string", b"")
        url = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.scope["headers"]}
        body = await request.body()
        rt: Runtime = request.app.state.runtime
        lot_id = await run_in_threadpool(_verify_lot, rt, request.method, url, headers, body)
        return QuoteCaller(lot_id=lot_id)
    if request.headers.get("authorization"):
        return QuoteCaller(driver_id=authenticate_driver(request).id)
    return QuoteCaller()


QuoteCallerDep = Annotated[QuoteCaller, Depends(quote_caller)]


def _drivers_plates(rt: Runtime, driver_id: str) -> set[tuple[str, str]]:
    """The plates the driver holds verified now, as billing knows them."""
    try:
        windows = rt.internal("billing").call(
            "GET", f"/internal/billing/drivers/{quote(driver_id, safe='')}/verified-windows"
        )
    except NotFound:
        return set()
    return {(w["plate"], w["plate_color"]) for w in windows or [] if w.get("until") is None}


def plate_shown(rt: Runtime, caller: QuoteCaller, lot_id: str, plate: str, color: str) -> bool:
    """Whether the quote may apply the plate's passes; 401 `auth_required` for nobody."""
    if caller.lot_id is not None:
        return caller.lot_id == lot_id
    if caller.driver_id is None:
        raise AuthRequired("Sign in as the driver of this vehicle to quote with its plate")
    wanted = (normalize_plate(plate), parse_plate_color(color).value)
    return wanted in _drivers_plates(rt, caller.driver_id)
