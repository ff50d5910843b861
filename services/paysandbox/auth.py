"""Who may call the payment sandbox: anyone in sandbox mode (the demo opens accounts in it);
otherwise only billing, with the bearer token derived for it (`Purpose.paysandbox`).

The sandbox moves (pretend) money and mints payment notifications billing trusts: wherever it
runs outside sandbox mode, an open sandbox would let anyone capture charges or drain accounts.
"""

from __future__ import annotations

from shared import sandboxes
from shared.errors import problem
from shared.keys import Purpose
from shared.settings import Settings

SandboxTokenInvalid = problem(
    401, "sandbox_token_invalid", "The payment sandbox needs billing's bearer token"
)


def sandbox_token(settings: Settings) -> str:
    """The bearer token billing presents to the sandbox."""
    return sandboxes.bearer(settings, Purpose.paysandbox)


require_caller = sandboxes.require_caller(Purpose.paysandbox, SandboxTokenInvalid)
