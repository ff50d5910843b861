"""Who may call the payment sandbox: anyone in sandbox mode (the demo opens accounts in it);
otherwise only billing, with the bearer token derived for it (`Purpose.paysandbox`).

The sandbox moves (pretend) money and mints payment notifications billing trusts: wherever it
runs outside sandbox mode, an open sandbox would let anyone capture charges or drain accounts.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from shared.errors import problem
from shared.keys import Purpose, derive_hex
from shared.settings import Settings

SandboxTokenInvalid = problem(
    401, "sandbox_token_invalid", "The payment sandbox needs billing's bearer token"
)


def sandbox_token(settings: Settings) -> str:
    """The bearer token billing presents to the sandbox."""
    return derive_hex(settings.jwt_secret.get_secret_value(), Purpose.paysandbox)


def _accepted(settings: Settings) -> list[str]:
    masters = [settings.jwt_secret, *settings.jwt_secret_previous]
    return [derive_hex(m.get_secret_value(), Purpose.paysandbox) for m in masters]


def require_caller(request: Request) -> None:
    settings: Settings = request.app.state.settings
    if settings.sandbox_mode:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    presented = token.strip() if scheme.lower() == "bearer" else ""
    if not presented or not any(hmac.compare_digest(presented, t) for t in _accepted(settings)):
        raise SandboxTokenInvalid()
