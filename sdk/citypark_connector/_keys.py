"""Ed25519 key pairs in the formats CityPark ops register: PKCS8 private, SPKI public PEM."""

from __future__ import annotations

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)


def generate_keypair() -> tuple[str, str]:
    """A new Ed25519 key pair as `(private_pem, public_pem)`.

    The private key (PKCS8) stays in the car park; send the public key (SubjectPublicKeyInfo)
    to CityPark ops to register on the lot.
    """
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return private_pem.decode("ascii"), public_key_pem(private_key)


def public_key_pem(private_key: Ed25519PrivateKey) -> str:
    """The SubjectPublicKeyInfo PEM of `private_key`'s public half."""
    public_pem = private_key.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    return public_pem.decode("ascii")


def load_private_key(pem: str | bytes, password: bytes | None = None) -> Ed25519PrivateKey:
    """Load a PKCS8 PEM private key; raise `ValueError` unless it is an Ed25519 key."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = load_pem_private_key(data, password=password)
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a usable PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the private key must be an Ed25519 key")
    return key
