"""`Idempotency-Key` on driver and admin writes: a repeat answers the first result.

Scope and conflicts. An answer is remembered for a day under the caller's credentials, the
method, the path and the key. A key reused with another body or query is refused (422
`idempotency_key_reused`); while the first request still runs, a repeat gets 409
`idempotency_in_progress` (with `Retry-After`).

What is remembered, and what releases the key so that a retry runs again:

* 2xx and 3xx answers are remembered.
* 4xx answers are remembered too: the request was decided (invalid, unknown, not allowed) and
  the same request decides the same way; a client that fixes its request sends another body
  (or a new key). Except 408, 425 and 429: they say "nothing was done, come back", so keeping
  them would turn every retry into the same refusal for a day.
* 5xx answers, an exception, a cancelled request (the server shutting down past its grace
  period) and a request that never answered release the key at once.
* A client that goes away while its request runs does not stop it: the answer is remembered
  and the client's retry gets it, so the work is not done twice.
* A running request holds its key on a lease of `LEASE_S`, renewed while it runs: if the
  process dies without running any of this code (killed, out of memory), the key is free again
  within `LEASE_S`, never held for the day.

A cancelled request is released although a handler running in a worker thread may still finish
its transaction: a key that stays `running` blocks the client for good, while the payment paths
carry their own idempotency in the database (a charge is keyed by its id at the provider).

Secrets at rest. Some answers are credentials shown exactly once: a driver's bearer token
(`POST /v1/auth/token`), a merchant's API key (created, or rotated by ops or by the merchant),
a driver's webhook signing secret (`PUT /v1/me/webhook`), a sandbox withholding agreement
number. A payment platform replays them rather than refusing the retry: a rotation kills the
old key at once and a sign-in code works once, so a client whose answer was lost would
otherwise be locked out. They must not sit readable in a cache that is dumped, replicated and
shared by every service, so every record, answers and `running` claims alike, is sealed with
AES-256-GCM under a key derived by HKDF-SHA256 from the platform secret; the slot name is the
associated data (a sealed answer cannot be moved to another caller's slot). The request
fingerprint is inside the seal too: a bare SHA-256 of a phone number and a six-digit code is
reversed in seconds. Each record starts with the id of its key, and the keys of the secret's
earlier values (`CITYPARK_JWT_SECRET_PREVIOUS`) still open their records, so rotating the
secret does not break replays; a record no key opens gets 409 `idempotency_answer_unreadable`
(the first request ran, its answer is lost: check the result, then use a new key).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import anyio
import redis
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import PROBLEM_BASE, PROBLEM_CONTENT_TYPE
from shared.keys import Purpose, derive
from shared.settings import Settings

log = structlog.get_logger(__name__)

TTL_S = 24 * 3600
LEASE_S = 30  # a running request's hold on its key, renewed every `RENEW_EVERY_S`
RENEW_EVERY_S = 10.0
WRITES = {"POST", "PUT", "PATCH", "DELETE"}
MAX_KEY_LENGTH = 200
TRANSIENT_4XX = frozenset({408, 425, 429})  # "not done, come back": never remembered
REPLAYED_HEADERS = ("content-type", "location")
FORMAT = "a1"  # AES-256-GCM, 12-byte nonce, key id from HKDF


class AnswerSeal:
    """Seals remembered answers with the current key and opens them with any known one."""

    def __init__(self, secret: str, previous: Sequence[str] = ()) -> None:
        keys = [_derive(s) for s in (secret, *previous)]
        self.kid, self._aead = keys[0]
        self._by_kid = dict(reversed(keys))  # the current key wins a (theoretical) clash

    def seal(self, slot: str, record: dict[str, Any]) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, json.dumps(record).encode(), slot.encode())
        return f"{FORMAT}.{self.kid}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, slot: str, stored: str) -> dict[str, Any] | None:
        """The record, or None when no key of ours opens it (unknown key, altered, foreign)."""
        try:
            fmt, kid, blob = stored.split(".", 2)
            aead = self._by_kid.get(kid) if fmt == FORMAT else None
            if aead is None:
                return None
            raw = base64.urlsafe_b64decode(blob)
            record = json.loads(aead.decrypt(raw[:12], raw[12:], slot.encode()))
        except (ValueError, InvalidTag):
            return None
        return record if isinstance(record, dict) else None


def _derive(secret: str) -> tuple[str, AESGCM]:
    def hkdf(info: bytes, length: int) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(), length=length, salt=b"citypark-idempotency", info=info
        ).derive(derive(secret, Purpose.idempotency))  # the master secret's idempotency key

    # The key id comes from its own HKDF output: it names the key without revealing it.
    kid = hkdf(b"answer key id", 6).hex()
    return kid, AESGCM(hkdf(b"answer key aes-256-gcm", 32))


@lru_cache(maxsize=8)
def _seal_for(secret: str, previous: tuple[str, ...]) -> AnswerSeal:
    return AnswerSeal(secret, previous)


def seal_of(settings: Settings) -> AnswerSeal:
    return _seal_for(
        settings.jwt_secret.get_secret_value(),
        tuple(s.get_secret_value() for s in settings.jwt_secret_previous),
    )


def _problem(status: int, code: str, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {
            "type": PROBLEM_BASE + code.replace("_", "-"),
            "title": detail,
            "status": status,
            "detail": detail,
            "code": code,
        },
        status_code=status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=headers or None,
    )


def _swap(r: redis.Redis, slot: str, expected: str, new: str | None) -> bool:
    """Replace (or delete, `new=None`) the slot only while it still holds our claim."""
    with r.pipeline() as pipe:
        try:
            pipe.watch(slot)
            if pipe.get(slot) != expected:
                pipe.unwatch()
                return False
            pipe.multi()
            if new is None:
                pipe.delete(slot)
            else:
                pipe.set(slot, new, ex=TTL_S)
            pipe.execute()
            return True
        except redis.WatchError:
            return False


def _release(r: redis.Redis, slot: str, claim: str, why: str) -> None:
    try:
        _swap(r, slot, claim, None)
    except redis.RedisError as exc:  # the lease frees it shortly anyway
        log.warning("idempotency.release_failed", why=why, error=repr(exc))


async def _renew(r: redis.Redis, slot: str) -> None:
    while True:
        await anyio.sleep(RENEW_EVERY_S)
        try:
            r.expire(slot, LEASE_S)
        except redis.RedisError as exc:
            log.warning("idempotency.renew_failed", error=repr(exc))


async def _read_body(receive: Receive) -> tuple[bytes, Receive] | None:
    """The whole request body, and a `receive` that hands it to the app again; None when the
    client went away before it finished sending."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, again


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in WRITES:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        key = headers.get("idempotency-key")
        path: str = scope["path"]
        if not key or path.startswith("/v1/connector"):  # connectors use event_id
            return await self.app(scope, receive, send)
        if len(key) > MAX_KEY_LENGTH:
            response = _problem(422, "idempotency_key_invalid", "Idempotency-Key is too long")
            return await response(scope, receive, send)

        read = await _read_body(receive)
        if read is None:
            return None  # nothing claimed, nothing to answer
        body, receive = read
        runtime = scope["app"].state.runtime
        r: redis.Redis = runtime.redis
        seal = seal_of(runtime.settings)
        who = hashlib.sha256(headers.get("authorization", "").encode()).hexdigest()
        scope_id = hashlib.sha256(f"{who}|{scope['method']}|{path}|{key}".encode()).hexdigest()
        slot = f"citypark:idem:{scope_id}"
        fingerprint = hashlib.sha256(scope.get("query_string", b"") + b"?" + body).hexdigest()
        claim = seal.seal(slot, {"state": "running", "fp": fingerprint})

        try:
            seen = self._claim_or_seen(r, slot, claim)
        except redis.RedisError as exc:
            log.warning("idempotency.cache_unavailable", error=repr(exc))
            response = _problem(
                503,
                "idempotency_unavailable",
                "Idempotency keys cannot be checked right now; nothing was done",
                **{"Retry-After": "2"},
            )
            return await response(scope, receive, send)
        if seen is not None:
            return await self._answer_seen(seal, slot, seen, fingerprint)(scope, receive, send)

        captured: list[Message] = []

        async def capture(message: Message) -> None:
            captured.append(message)  # held back until the answer is remembered

        error: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_renew, r, slot)
                try:
                    await self.app(scope, receive, capture)
                except Exception as exc:  # raised below, outside the task group's wrapping
                    error = exc
                finally:
                    tg.cancel_scope.cancel()
        except BaseException:
            _release(r, slot, claim, "cancelled")
            raise
        if error is not None:
            _release(r, slot, claim, "exception")
            raise error

        status = next((m["status"] for m in captured if m["type"] == "http.response.start"), None)
        if status is None or status >= 500 or status in TRANSIENT_4XX:
            _release(r, slot, claim, f"status {status}")
        else:
            self._remember(r, seal, slot, claim, fingerprint, status, captured)
        for message in captured:
            await send(message)

    @staticmethod
    def _claim_or_seen(r: redis.Redis, slot: str, claim: str) -> str | None:
        """None when this request holds the key now; else what the slot holds."""
        for _ in range(3):  # the slot can be released between our SET and our GET
            if r.set(slot, claim, nx=True, ex=LEASE_S):
                return None
            seen = r.get(slot)
            if seen is not None:
                return str(seen)
        raise redis.RedisError("the idempotency slot keeps changing")

    @staticmethod
    def _answer_seen(seal: AnswerSeal, slot: str, stored: str, fingerprint: str) -> Response:
        seen = seal.open(slot, stored)
        if seen is None:
            return _problem(
                409,
                "idempotency_answer_unreadable",
                "The first request with this Idempotency-Key ran but its answer can no longer "
                "be read; check its result, then use a new key",
            )
        if seen.get("fp") != fingerprint:
            return _problem(
                422,
                "idempotency_key_reused",
                "This Idempotency-Key was used with another request body",
            )
        if seen.get("state") != "done":
            return _problem(
                409,
                "idempotency_in_progress",
                "The first request with this key is still running",
                **{"Retry-After": "1"},
            )
        return Response(
            base64.b64decode(seen["body"]),
            status_code=seen["status"],
            headers={**dict(seen["headers"]), "Idempotent-Replayed": "true"},
        )

    @staticmethod
    def _remember(
        r: redis.Redis,
        seal: AnswerSeal,
        slot: str,
        claim: str,
        fingerprint: str,
        status: int,
        captured: list[Message],
    ) -> None:
        start = next(m for m in captured if m["type"] == "http.response.start")
        kept = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in start.get("headers", [])
            if k.decode("latin-1").lower() in REPLAYED_HEADERS
        ]
        content = b"".join(
            m.get("body", b"") for m in captured if m["type"] == "http.response.body"
        )
        record = {
            "state": "done",
            "fp": fingerprint,
            "status": status,
            "headers": kept,
            "body": base64.b64encode(content).decode(),
        }
        try:
            if not _swap(r, slot, claim, seal.seal(slot, record)):
                log.warning("idempotency.claim_lost", status=status)
        except redis.RedisError as exc:  # the answer still goes out; the lease frees the key
            log.warning("idempotency.remember_failed", status=status, error=repr(exc))


def install(app: FastAPI) -> None:
    app.add_middleware(IdempotencyMiddleware)
