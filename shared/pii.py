"""Personal data protected where it rests and where it travels: phones and plates.

* `encrypt` / `decrypt`: AES-256-GCM with a fresh 96-bit nonce; the text form names the key
  that wrote it (`pii1.<key id>.<base64url(nonce | ciphertext)>`), so keys can rotate while old
  values stay readable until they are re-encrypted.
* `blind_index`: an HMAC-SHA256 of the normalised value under the index key, for equality
  look-ups on encrypted columns (`WHERE phone_bidx = :bidx`) without decrypting anything.
* `plate_ref`: a pseudonym of one vehicle (plate and colour), the same blind index; what Redis
  keys, Kafka keys and log lines carry instead of the plate.

Keys come from settings (`data_keys`, `data_key_id`, `data_index_key`); see docs/privacy.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from functools import lru_cache

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.keys import Purpose, derive
from shared.settings import Settings

PREFIX = "pii1"
DERIVED_KEY_ID = "derived"
NONCE_BYTES = 12


class DataKeyUnknown(Exception):
    """A value was written under a key this process does not hold."""


def _aes_key(secret: str) -> bytes:
    return derive(secret, Purpose.data_encryption)


@lru_cache(maxsize=32)
def _keys(
    data_keys: tuple[tuple[str, str], ...], data_key_id: str | None, masters: tuple[str, ...]
) -> tuple[str, dict[str, list[bytes]]]:
    """(current key id, key id → candidate AES keys). A derived key may come from the master
    secret or a previous one during a rotation of the master secret."""
    keys: dict[str, list[bytes]] = {kid: [_aes_key(secret)] for kid, secret in data_keys}
    keys.setdefault(DERIVED_KEY_ID, [_aes_key(m) for m in masters])
    current = data_key_id or (data_keys[0][0] if data_keys else DERIVED_KEY_ID)
    if current not in keys:
        raise DataKeyUnknown(f"data_key_id {current!r} is not among data_keys")
    return current, keys


def _keyring(settings: Settings) -> tuple[str, dict[str, list[bytes]]]:
    return _keys(
        tuple((kid, v.get_secret_value()) for kid, v in settings.data_keys.items()),
        settings.data_key_id,
        tuple(m.get_secret_value() for m in [settings.jwt_secret, *settings.jwt_secret_previous]),
    )


def current_key_id(settings: Settings) -> str:
    return _keyring(settings)[0]


def encrypt(settings: Settings, plaintext: str) -> str:
    kid, keys = _keyring(settings)
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(keys[kid][0]).encrypt(nonce, plaintext.encode(), kid.encode())
    return f"{PREFIX}.{kid}.{base64.urlsafe_b64encode(nonce + sealed).decode().rstrip('=')}"


def is_encrypted(value: str | None) -> bool:
    return bool(value) and str(value).startswith(PREFIX + ".")


def key_id_of(token: str) -> str:
    return token.split(".", 2)[1]


def decrypt(settings: Settings, token: str) -> str:
    """The plaintext; the key id is authenticated with it, so a value cannot be passed off
    as written under another key."""
    prefix, kid, body = token.split(".", 2)
    if prefix != PREFIX:
        raise ValueError("not an encrypted value")
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    nonce, sealed = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
    candidates = _keyring(settings)[1].get(kid)
    if not candidates:
        raise DataKeyUnknown(f"no data key {kid!r} in this process")
    last: Exception | None = None
    for key in candidates:
        try:
            return AESGCM(key).decrypt(nonce, sealed, kid.encode()).decode()
        except Exception as exc:  # InvalidTag: try the next candidate (a master rotation)
            last = exc
    raise DataKeyUnknown(f"data key {kid!r} does not open this value") from last


def reveal(settings: Settings, value: str) -> str:
    """The plaintext of a value that may still be stored in clear (rows not yet converted)."""
    return decrypt(settings, value) if is_encrypted(value) else value


@lru_cache(maxsize=8)
def _index_key(index_secret: str | None, master: str) -> bytes:
    if index_secret:
        return hashlib.sha256(b"citypark blind index|" + index_secret.encode()).digest()
    return derive(master, Purpose.blind_index)


def blind_index(settings: Settings, kind: str, value: str) -> str:
    """A stable 128-bit HMAC of a normalised value of one kind (`phone`, `plate`), hex."""
    secret = settings.data_index_key.get_secret_value() if settings.data_index_key else None
    key = _index_key(secret, settings.jwt_secret.get_secret_value())
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:32]


def plate_ref(settings: Settings, plate: str, plate_color: str) -> str:
    """The pseudonym of one vehicle: its canonical plate and colour under the index key."""
    return "v_" + blind_index(settings, "plate", f"{plate}:{plate_color}")


def phone_ref(settings: Settings, phone: str) -> str:
    return "p_" + blind_index(settings, "phone", phone)
