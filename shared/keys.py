"""One key per purpose, each derived from the master secret (`CITYPARK_JWT_SECRET`) with HKDF.

A key that leaks from one use (say, a webhook secret a driver holds, or the paysandbox bearer)
tells nothing about the others, and none of them is the master secret itself. The derivation
is deterministic, so every process of the city finds the same key without sharing anything but
the master secret; rotating that secret changes every key at once (docs/security.md says what
each rotation means).
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MIN_SECRET_BYTES = 32
# Values copied from examples and tutorials rather than generated: refused however long.
PLACEHOLDER_PREFIXES = ("change-me", "changeme", "change_me", "secret", "test", "example")
MIN_DISTINCT_CHARS = 8
SALT = b"citypark/keys/v1"


class Purpose(StrEnum):
    """What a derived key is for; the value is the HKDF `info`, so never change one."""

    driver_tokens = "driver tokens"
    admin_tokens = "admin tokens"
    internal_token = "internal token"
    otp_hashes = "otp hashes"
    webhook_secrets = "webhook secrets"
    idempotency = "idempotency answers"
    paysandbox = "paysandbox bearer"
    vehicleregistry = "vehicle registry bearer"
    paysandbox_notify = "paysandbox notifications"
    forwarded_for = "gateway forwarded-for proof"
    signin_tags = "sign-in tags"
    data_encryption = "personal data encryption"
    blind_index = "personal data blind index"


@lru_cache(maxsize=128)
def derive(master: str, purpose: Purpose) -> bytes:
    """The 32-byte key for `purpose` under the master secret `master`."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=SALT, info=f"citypark {purpose.value}".encode()
    ).derive(master.encode())


def derive_hex(master: str, purpose: Purpose) -> str:
    """The same key as text, for the places that pass secrets around as strings."""
    return derive(master, purpose).hex()


def secret_problem(value: str) -> str | None:
    """Why `value` cannot be a master secret, or None when it can."""
    if len(value.encode()) < MIN_SECRET_BYTES:
        return (
            f"is {len(value.encode())} bytes long; it must be at least {MIN_SECRET_BYTES} "
            "random bytes, e.g. `openssl rand -hex 32`"
        )
    lowered = value.strip().lower()
    if lowered.startswith(PLACEHOLDER_PREFIXES):
        return "is a placeholder, not a secret; generate one with `openssl rand -hex 32`"
    if len(set(value)) < MIN_DISTINCT_CHARS:
        return "repeats a few characters; generate one with `openssl rand -hex 32`"
    return None
