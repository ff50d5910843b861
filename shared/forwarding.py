"""Who is calling: the client address a service may trust.

In the real topology drivers reach a service through the gateway's proxy, which sets
`x-forwarded-for` to the address it was called from and proves that it did with
`x-citypark-forwarded` (an HMAC derived from the platform secret, which callers do not have).
A service trusts `x-forwarded-for` only with that proof; anything else (a header a client made
up, or a request that reached the service directly) is the TCP peer, `request.client.host`.
In the embedded city there is no proxy: the peer is the caller.

Servers run with uvicorn's `proxy_headers` off (services/cli.py), so the peer is the socket's,
never rewritten from a header.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from shared.keys import Purpose, derive_hex

FORWARDED_FOR = "x-forwarded-for"
FORWARDED_PROOF = "x-citypark-forwarded"
UNKNOWN = "unknown"


def forwarding_proof(secret: str) -> str:
    """What the gateway's proxy presents with the address it forwards."""
    return derive_hex(secret, Purpose.forwarded_for)  # `secret` is the master secret


def client_address(request: Request, secret: str) -> str:
    forwarded = request.headers.get(FORWARDED_FOR, "")
    proof = request.headers.get(FORWARDED_PROOF, "")
    if forwarded and proof and hmac.compare_digest(proof, forwarding_proof(secret)):
        # The gateway sets exactly one address (its own peer), never a client's list.
        return forwarded.split(",")[0].strip() or UNKNOWN
    return request.client.host if request.client else UNKNOWN
