"""Verify connector requests signed per RFC 9421 with Ed25519 (SPEC §4).

Pure: no I/O and no configuration. The caller resolves key ids to public keys and checks the
returned nonce for reuse (that needs Redis).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import http_sf
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from http_message_signatures import (
    ContentDigest,
    HTTPMessageSignaturesException,
    HTTPMessageVerifier,
    MappingKeyResolver,
    algorithms,
)

from shared.errors import (
    DigestMismatch,
    KeyUnknown,
    SignatureExpired,
    SignatureInvalid,
    SignatureMissing,
    problem,
)

__all__ = [
    "DIGEST_COMPONENT",
    "REQUIRED_COMPONENTS",
    "SIGNATURE_ALG",
    "SIGNATURE_TAG",
    "PublicKeyInvalid",
    "VerifiedRequest",
    "content_digest",
    "load_public_key",
    "verify_request",
]

SIGNATURE_TAG = "citypark"
SIGNATURE_ALG = "ed25519"
REQUIRED_COMPONENTS = ("@method", "@path", "@query")
DIGEST_COMPONENT = "content-digest"

# 16 random bytes need at least 22 characters in base64url, the densest URL-safe encoding;
# the upper bound keeps nonces reasonable as Redis keys.
_NONCE = re.compile(r"[A-Za-z0-9_-]{22,128}")
# The authority is not covered, so an origin-form URL ("/path?query") gets a placeholder host
# only to satisfy the library's absolute-URL parser.
_PLACEHOLDER_ORIGIN = "http://connector.invalid"

PublicKeyInvalid = problem(
    422, "public_key_invalid", "The public key is not an Ed25519 public key in PEM"
)


@dataclass(frozen=True)
class VerifiedRequest:
    key_id: str
    created: int
    nonce: str


def content_digest(body: bytes) -> str:
    """The RFC 9530 `Content-Digest` value of `body`: `sha-256=:<base64>:`."""
    return ContentDigest.create(body)


def load_public_key(pem: str) -> Ed25519PublicKey:
    """Load a SubjectPublicKeyInfo PEM; raise `PublicKeyInvalid` unless it is Ed25519."""
    try:
        key = load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PublicKeyInvalid("The public key is not a valid PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise PublicKeyInvalid("The public key must be an Ed25519 key")
    return key


def verify_request(
    *,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    resolve_key: Callable[[str], Ed25519PublicKey | None],
    now: float | None = None,
    max_skew_s: int = 300,
) -> VerifiedRequest:
    """Verify the `tag="citypark"` signature of a request and its body digest.

    `url` is the URL as received, still percent-encoded (absolute or "/path?query"); `headers`
    are matched case-insensitively. Raises `SignatureMissing`, `SignatureInvalid`, `KeyUnknown`,
    `SignatureExpired` or `DigestMismatch`. Nonce reuse is the caller's check.
    """
    fields = _header_fields(headers)
    if not fields.get("signature-input") or not fields.get("signature"):
        raise SignatureMissing("Signature-Input and Signature headers are required")
    label, components, params = _select_signature(fields)
    key_id, created, nonce = _check_parameters(params)

    missing = [name for name in REQUIRED_COMPONENTS if (name, ()) not in components]
    if missing:
        raise SignatureInvalid(f"The signature must cover {', '.join(missing)}")
    if body:
        if not any(name == DIGEST_COMPONENT for name, _ in components):
            raise DigestMismatch("A request with a body must sign its content-digest")
        if DIGEST_COMPONENT not in fields:
            raise DigestMismatch("A request with a body must carry a Content-Digest header")

    current = time.time() if now is None else now
    if abs(current - created) > max_skew_s:
        raise SignatureExpired(f"created must be within {max_skew_s} s of server time")
    expires = params.get("expires")
    if type(expires) is int and expires < current:
        raise SignatureExpired("The signature has expired")

    public_key = resolve_key(key_id)
    if public_key is None:
        raise KeyUnknown(f"No active key is registered under keyid {key_id!r}")

    verifier = _Verifier(
        signature_algorithm=algorithms.ED25519,
        key_resolver=MappingKeyResolver(public_keys={key_id: public_key}, private_keys={}),
    )
    message = _Message(
        method=method,
        url=_PLACEHOLDER_ORIGIN + url if url.startswith("/") else url,
        headers=fields,
    )
    try:
        results = verifier.verify(
            message, max_age=None, expect_tag=SIGNATURE_TAG, expect_label=label
        )
    except (HTTPMessageSignaturesException, ValueError, TypeError) as exc:
        raise SignatureInvalid("The signature does not verify") from exc
    try:
        verifier.verify_body(message, results, body)
    except HTTPMessageSignaturesException as exc:
        raise DigestMismatch("The body does not match its Content-Digest") from exc
    return VerifiedRequest(key_id=key_id, created=created, nonce=nonce)


@dataclass(frozen=True)
class _Message:
    """The request view the library reads: an uppercase method, an encoded URL, headers."""

    method: str
    url: str
    headers: dict[str, str]


class _Verifier(HTTPMessageVerifier):
    def validate_created_and_expires(self, sig_input: object, max_age: object = None) -> None:
        # The library checks against its own wall clock with a 5 s skew; verify_request has
        # already applied the contract's ±max_skew_s against the injectable `now`.
        return None


_Component = tuple[str, tuple[tuple[str, Any], ...]]


def _header_fields(headers: Mapping[str, str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        fields[key] = f"{fields[key]}, {value}" if key in fields else value
    return fields


def _parse_dictionary(value: str, header: str) -> dict[str, Any]:
    def reject_duplicate(key: str, context: str) -> None:
        if context == "dictionary":
            raise ValueError(f"duplicate label {key!r}")

    try:
        parsed = http_sf.parse(
            value.encode("utf-8"), tltype="dictionary", on_duplicate_key=reject_duplicate
        )
    except (ValueError, TypeError) as exc:
        raise SignatureInvalid(f"The {header} header is not a valid structured field") from exc
    if not isinstance(parsed, dict):
        raise SignatureInvalid(f"The {header} header is not a dictionary")
    return parsed


def _select_signature(
    fields: Mapping[str, str],
) -> tuple[str, list[_Component], dict[str, Any]]:
    """The first signature tagged `citypark`: its label, covered components and parameters."""
    inputs = _parse_dictionary(fields["signature-input"], "Signature-Input")
    signatures = _parse_dictionary(fields["signature"], "Signature")
    for label, (members, params) in inputs.items():
        if params.get("tag") != SIGNATURE_TAG:
            continue
        if not isinstance(members, list):
            raise SignatureInvalid(f"Signature-Input {label!r} must be an inner list")
        signature = signatures.get(label)
        if signature is None or not isinstance(signature[0], bytes):
            raise SignatureInvalid(f"Signature {label!r} is missing or not a byte sequence")
        components: list[_Component] = []
        for name, component_params in members:
            if not isinstance(name, str):
                raise SignatureInvalid("Covered components must be strings")
            components.append((name, tuple(sorted(component_params.items()))))
        return label, components, dict(params)
    raise SignatureInvalid(f'No signature has tag="{SIGNATURE_TAG}"')


def _check_parameters(params: Mapping[str, Any]) -> tuple[str, int, str]:
    key_id = params.get("keyid")
    created = params.get("created")
    nonce = params.get("nonce")
    alg = params.get("alg")
    if not isinstance(key_id, str) or not key_id:
        raise SignatureInvalid("The signature must carry a keyid")
    # bool is an int subclass, and a structured-field boolean is not a timestamp.
    if type(created) is not int:
        raise SignatureInvalid("The signature must carry an integer created")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise SignatureInvalid("The signature must carry a random URL-safe nonce of >= 16 bytes")
    if alg != SIGNATURE_ALG:
        raise SignatureInvalid(f'The signature must carry alg="{SIGNATURE_ALG}"')
    return key_id, created, nonce
