"""RFC 9421 signature check for connector (and district platform) requests.

The key id identifies the caller; keys are resolved through the lots service and cached in
Redis briefly, nonces are remembered in Redis for the signature window. Should Redis lose
them, signatures created before the loss was noticed are refused (see docs/gate.md).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from services.gateway.gate import rebuild
from shared.errors import KeyUnknown, NonceReused, NotFound, problem
from shared.runtime import Runtime
from shared.signatures import load_public_key, verify_request

KEY_CACHE_S = 10  # a deleted key stops working within this many seconds
# Key ids are registered in this shape; anything else is unknown before any lookup, so a
# caller's text never reaches an internal URL or a cache key.
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

SignaturePredatesReset = problem(
    401,
    "signature_predates_reset",
    "The signature was made before the gateway's replay protection was reset; sign afresh",
)


@dataclass(frozen=True)
class Caller:
    key_id: str
    kind: str  # "lot" | "district"
    district: str
    lot_id: str | None
    lot_code: str | None
    operator_id: str | None
    postpay_enabled: bool


def _resolve(rt: Runtime, key_id: str) -> dict[str, object] | None:
    if not KEY_ID.fullmatch(key_id) or key_id.strip(".") == "":
        raise KeyUnknown("No key is registered under this keyid")
    cache_key = f"citypark:gw:key:{key_id}"
    cached = rt.redis.get(cache_key)
    if cached is not None:
        return json.loads(cached) or None  # type: ignore[no-any-return]
    try:
        found = rt.internal("lots").call("GET", f"/internal/lots/keys/{key_id}")
    except NotFound:
        found = None
    rt.redis.set(cache_key, json.dumps(found or {}), ex=KEY_CACHE_S)
    return found  # type: ignore[no-any-return]


def _verify(rt: Runtime, method: str, url: str, headers: dict[str, str], body: bytes) -> Caller:
    resolved: dict[str, dict[str, object] | None] = {}

    def resolve_key(key_id: str):  # type: ignore[no-untyped-def]
        resolved[key_id] = info = _resolve(rt, key_id)
        return load_public_key(str(info["public_key_pem"])) if info else None

    verified = verify_request(
        method=method,
        url=url,
        headers=headers,
        body=body,
        resolve_key=resolve_key,
        now=time.time(),
        max_skew_s=rt.settings.signature_max_skew_s,
    )
    window = 2 * rt.settings.signature_max_skew_s + 60
    pipe = rt.redis.pipeline(transaction=False)  # one round trip, as before the marker
    pipe.set(f"citypark:gw:nonce:{verified.key_id}:{verified.nonce}", 1, nx=True, ex=window)
    pipe.hget(rebuild.MARKER, "lost_at")
    fresh, lost_at_raw = pipe.execute()
    lost_at = rebuild.lost_at_for_request(rt.redis, lost_at_raw)
    # Redis forgot the nonces it held: a signature made before the loss was noticed may
    # have been used already, and nothing else would tell its replay apart. Whole seconds,
    # like `created`, so a request signed after the loss is never refused for rounding.
    if lost_at is not None and verified.created < lost_at // 1000:
        raise SignaturePredatesReset(
            f"created {verified.created} is before {lost_at // 1000}, when the gateway lost "
            "its record of used nonces; sign the request again"
        )
    if not fresh:
        raise NonceReused("This signature was already used; sign every request afresh")
    info = resolved[verified.key_id]
    assert info is not None
    return Caller(
        key_id=verified.key_id,
        kind=str(info["kind"]),
        district=str(info["district"]),
        lot_id=info.get("lot_id"),  # type: ignore[arg-type]
        lot_code=info.get("lot_code"),  # type: ignore[arg-type]
        operator_id=info.get("operator_id"),  # type: ignore[arg-type]
        postpay_enabled=bool(info.get("postpay_enabled")),
    )


async def verify_signature(request: Request) -> Caller:
    body = await request.body()
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string", b"")
    url = (
        "http://gateway"
        + raw_path.decode("latin-1")
        + ("?" + query.decode("latin-1") if query else "")
    )
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.scope["headers"]}
    rt: Runtime = request.app.state.runtime
    return await run_in_threadpool(_verify, rt, request.method, url, headers, body)


def _lot_caller(caller: Annotated[Caller, Depends(verify_signature)]) -> Caller:
    if caller.kind != "lot" or caller.lot_id is None:
        from shared.errors import Forbidden

        raise Forbidden("This key belongs to a district platform, not a car park")
    return caller


LotAuth = Annotated[Caller, Depends(_lot_caller)]
SignedCaller = Annotated[Caller, Depends(verify_signature)]
