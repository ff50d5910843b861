"""Who may call the sandbox vehicle registry: anyone in sandbox mode (the demo registers its
cars); otherwise only billing, with the bearer token derived for it (`Purpose.vehicleregistry`).

Billing trusts the registry's word on who owns a car: an open registry outside sandbox mode
would let anyone register a stranger's plate under their own name and then prove it.
"""

from __future__ import annotations

from shared import sandboxes
from shared.errors import problem
from shared.keys import Purpose

RegistryTokenInvalid = problem(
    401, "registry_token_invalid", "The vehicle registry sandbox needs billing's bearer token"
)

require_caller = sandboxes.require_caller(Purpose.vehicleregistry, RegistryTokenInvalid)
