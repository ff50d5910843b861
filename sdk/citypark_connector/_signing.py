"""RFC 9421 request signing with Ed25519, as CityPark's connector API expects (SPEC §4)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Generator
from datetime import UTC, datetime

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import HTTPMessageSigner, MappingKeyResolver, algorithms

from ._keys import load_private_key

SIGNATURE_TAG = "citypark"
SIGNATURE_LABEL = "citypark"
COVERED_COMPONENTS = ("@method", "@path", "@query")
# Headers a previous signing pass added; the library refuses to sign over an existing digest.
_SIGNING_HEADERS = ("content-digest", "signature-input", "signature")


def new_nonce() -> str:
    """A random, URL-safe nonce of 16 bytes (22 characters)."""
    return secrets.token_urlsafe(16)


def sign_request(
    request: httpx.Request,
    key_id: str,
    private_key: Ed25519PrivateKey | str,
    *,
    created: int | None = None,
    nonce: str | None = None,
) -> httpx.Request:
    """Sign `request` in place and return it.

    Adds `Content-Digest` (sha-256) when there is a body, then `Signature-Input` and
    `Signature` covering `@method`, `@path`, `@query` (and `content-digest`), with `created`,
    `keyid`, `nonce`, `alg="ed25519"` and `tag="citypark"`. Any earlier signature is replaced,
    so a retried request gets a fresh nonce and timestamp.
    """
    key = load_private_key(private_key) if isinstance(private_key, str) else private_key
    body = request.read()
    for name in _SIGNING_HEADERS:
        request.headers.pop(name, None)
    signer = HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519,
        key_resolver=MappingKeyResolver(public_keys={}, private_keys={key_id: key}),
    )
    signer.sign(
        request,
        key_id=key_id,
        created=datetime.fromtimestamp(time.time() if created is None else created, UTC),
        nonce=new_nonce() if nonce is None else nonce,
        label=SIGNATURE_LABEL,
        tag=SIGNATURE_TAG,
        covered_component_ids=COVERED_COMPONENTS,
        # An empty body is no body: the library would otherwise add a digest of b"".
        body=body or None,
    )
    return request


class SignatureAuth(httpx.Auth):
    """httpx auth that signs every request it sends, each time afresh (retries included)."""

    requires_request_body = True

    def __init__(
        self,
        key_id: str,
        private_key: Ed25519PrivateKey | str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key_id = key_id
        self._private_key = (
            load_private_key(private_key) if isinstance(private_key, str) else private_key
        )
        self._clock = clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        sign_request(request, self.key_id, self._private_key, created=int(self._clock()))
        yield request
