"""The vehicle registry port: does the registry know this plate with this owner and VIN?

The city's registry answers `match: true/false` and never says who the owner is; the sandbox
one (`citypark run vehicleregistry`, mounted at /sandbox/vehicle-registry when embedded)
behaves the same way.
"""

from __future__ import annotations

from typing import Protocol

import httpx


class RegistryUnavailable(Exception):
    """The registry did not answer (down, timed out, or answered with a server error)."""


class VehicleRegistry(Protocol):
    def matches(self, *, plate: str, plate_color: str, owner_name: str, vin_last6: str) -> bool:
        """True when the registry holds the plate with this owner and VIN ending; False when
        it does not (wrong owner or VIN, or a plate it does not know)."""
        ...


class HttpVehicleRegistry:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 3.0,
        transport: httpx.BaseTransport | None = None,
        token: str | None = None,
    ) -> None:
        # The sandbox registry wants billing's bearer token outside sandbox mode.
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout, transport=transport, headers=headers
        )

    def matches(self, *, plate: str, plate_color: str, owner_name: str, vin_last6: str) -> bool:
        body = {
            "plate": plate,
            "plate_color": plate_color,
            "owner_name": owner_name,
            "vin_last6": vin_last6,
        }
        try:
            response = self.http.post("/v1/verifications", json=body)
        except httpx.TransportError as exc:  # includes timeouts
            raise RegistryUnavailable(f"vehicle registry unreachable: {exc!r}") from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise RegistryUnavailable(f"vehicle registry answered {response.status_code}")
        if response.status_code != 200:
            # A refusal of what we sent is a contract breach, not a fact about the driver.
            raise RegistryUnavailable(
                f"vehicle registry refused the look-up: {response.status_code} "
                f"{response.text[:200]}"
            )
        try:
            return response.json()["match"] is True
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryUnavailable("vehicle registry answered something unreadable") from exc

    def close(self) -> None:
        self.http.close()
