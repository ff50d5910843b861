"""A fake city behind httpx.MockTransport: verifies signatures, dedupes, fails on demand."""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from citypark_connector import ConnectorClient, generate_keypair
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from http_message_signatures import HTTPMessageVerifier, MappingKeyResolver, algorithms

KEY_ID = "lot-test-k1"
INVALID_PLATE = "BAD"


@dataclass
class FakeCity:
    public_pem: str
    down: bool = False
    delay_s: float = 0.0
    lose_answers: int = 0  # accept, then drop this many answers (the SDK sees a network error)
    rate_limited: int = 0  # answer this many requests with 429
    retry_after_s: int = 1
    # How the city answers an item carrying `offline_decision`, if it refuses it.
    offline_field_refusal: dict[str, str] | None = None
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)
    eligible: set[str] = field(default_factory=set)  # "<plate>:<color>"
    # This car park's salt: the snapshot lists scrypt(plate:color) under it, as the city does.
    salt: str = field(default_factory=lambda: secrets.token_hex(16))
    snapshot_format: int = 2
    eligibility_version: int = 1
    snapshot_complete: bool = True  # False: the city is still hashing newly eligible vehicles
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        key = load_pem_public_key(self.public_pem.encode())
        self.verifier = HTTPMessageVerifier(
            signature_algorithm=algorithms.ED25519,
            key_resolver=MappingKeyResolver(public_keys={KEY_ID: key}, private_keys={}),
        )

    def enroll(self, plate: str, color: str) -> None:
        self.eligible.add(f"{plate}:{color}")
        self.eligibility_version += 1

    def kdf(self) -> dict[str, Any]:
        return {"name": "scrypt", "salt": self.salt, "n": 2**14, "r": 8, "p": 1, "dklen": 32}

    def hashed(self) -> list[str]:
        kdf = self.kdf()
        return sorted(
            hashlib.scrypt(
                v.encode(),
                salt=bytes.fromhex(kdf["salt"]),
                n=kdf["n"],
                r=kdf["r"],
                p=kdf["p"],
                dklen=kdf["dklen"],
            ).hex()
            for v in self.eligible
        )

    def delivered_ids(self) -> list[str]:
        return [body["event_id"] for _, body in self.received]

    def _accept(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        event_id = body["event_id"]
        if body["plate"] == INVALID_PLATE:
            return {"status": "rejected", "code": "plate_invalid", "detail": "not a plate"}
        if "offline_decision" in body and self.offline_field_refusal is not None:
            return {"status": "rejected", **self.offline_field_refusal}
        if event_id in self.seen:
            return {**self.seen[event_id], "status": "duplicate"}
        self.received.append((kind, body))
        answer: dict[str, Any] = {"event_id": event_id, "status": "accepted"}
        if kind == "exit":
            eligible = f"{body['plate']}:{body['plate_color']}" in self.eligible
            answer |= {
                "decision": "postpay" if eligible else "pay_on_site",
                "reason": "enrolled" if eligible else "not_eligible",
                "session_id": None,
            }
        self.seen[event_id] = answer
        return answer

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.down:
            raise httpx.ConnectError("city unreachable", request=request)
        request.read()
        self.verifier.verify(request, expect_tag="citypark")
        with self.lock:
            self.requests.append(request.url.path)
            if self.rate_limited:
                self.rate_limited -= 1
                return httpx.Response(
                    429,
                    json={"code": "rate_limited", "detail": "slow down"},
                    headers={"retry-after": str(self.retry_after_s)},
                )
            path = request.url.path
            if path == "/v1/connector/eligibility":
                etag = f'"{self.eligibility_version}"'
                if request.headers.get("if-none-match") == etag:
                    return httpx.Response(304, headers={"etag": etag})
                return httpx.Response(
                    200,
                    json={
                        "version": self.eligibility_version,
                        "format": self.snapshot_format,
                        "lot_postpay_enabled": True,
                        "kdf": self.kdf(),
                        "complete": self.snapshot_complete,
                        "vehicles": self.hashed() if self.snapshot_complete else [],
                    },
                    headers={"etag": etag},
                )
            body = json.loads(request.content) if request.content else {}
            if path == "/v1/connector/batches":
                results = []
                for index, item in enumerate(body["events"]):
                    item = dict(item)
                    kind = item.pop("kind")
                    results.append({"index": index, **self._accept(kind, item)})
                response = httpx.Response(200, json={"results": results})
            elif path in ("/v1/connector/entries", "/v1/connector/exits"):
                kind = "entry" if path.endswith("entries") else "exit"
                answer = self._accept(kind, body)
                if answer["status"] == "rejected":
                    return httpx.Response(
                        422,
                        json={"code": answer["code"], "detail": answer["detail"]},
                        headers={"content-type": "application/problem+json"},
                    )
                response = httpx.Response(202 if kind == "entry" else 200, json=answer)
            elif path == "/v1/connector/heartbeats":
                response = httpx.Response(200, json={"status": "ok"})
            else:
                return httpx.Response(404, json={"code": "not_found"})
            if self.lose_answers:
                self.lose_answers -= 1
                raise httpx.ReadError("connection reset after the city committed", request=request)
            return response

    async def handle_async(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        return self.handle(request)


@pytest.fixture
def keys() -> tuple[str, str]:
    return generate_keypair()


@pytest.fixture
def city(keys: tuple[str, str]) -> FakeCity:
    return FakeCity(public_pem=keys[1])


@pytest.fixture
def make_client(keys: tuple[str, str], city: FakeCity, tmp_path: Path) -> Iterator[Any]:
    clients: list[ConnectorClient] = []

    def make(**overrides: Any) -> ConnectorClient:
        options: dict[str, Any] = {
            "base_url": "https://city.test",
            "outbox_path": tmp_path / "outbox.sqlite3",
            "transport": httpx.MockTransport(city.handle),
            "async_transport": httpx.MockTransport(city.handle_async),
            "backoff_base_s": 0.05,
            "backoff_cap_s": 0.2,
        } | overrides
        client = ConnectorClient(KEY_ID, keys[0], **options)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()
