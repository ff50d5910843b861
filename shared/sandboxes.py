"""Who may call a sandbox service (payments, vehicle registry): anyone in sandbox mode (the demo
opens accounts and registers cars in them); otherwise only the service that uses it, with a
bearer token derived for that sandbox from the master secret.

A sandbox stands in for an outside party whose answers CityPark trusts (money taken, a car's
owner): wherever one runs outside sandbox mode, leaving it open would let anyone forge them.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Request

from shared.errors import Problem
from shared.keys import Purpose, derive_hex
from shared.settings import Settings


def bearer(settings: Settings, purpose: Purpose) -> str:
    """The bearer token the sandbox's caller presents."""
    return derive_hex(settings.jwt_secret.get_secret_value(), purpose)


def require_caller(purpose: Purpose, refused: type[Problem]) -> Callable[[Request], None]:
    """A dependency: open in sandbox mode, else the bearer derived for `purpose` (under the
    current or a previous master secret, so a rotation does not cut the caller off)."""

    def check(request: Request) -> None:
        settings: Settings = request.app.state.settings
        if settings.sandbox_mode:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = token.strip() if scheme.lower() == "bearer" else ""
        masters = [settings.jwt_secret, *settings.jwt_secret_previous]
        accepted = [derive_hex(m.get_secret_value(), purpose) for m in masters]
        if not presented or not any(hmac.compare_digest(presented, t) for t in accepted):
            raise refused()

    return check
