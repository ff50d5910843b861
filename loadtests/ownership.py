"""Proof of vehicle ownership for tests and load tools: register a driver's car in the sandbox
vehicle registry and verify it through the city's API, so it leaves on post-pay.

`http` is any httpx-style client (httpx.Client, FastAPI's TestClient) whose base URL is the
city; `registry` is the sandbox registry's base, a path on that client when the city runs
embedded (the default) or an absolute URL in the real topology (`Topology.registry`).
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

EMBEDDED_REGISTRY = "/sandbox/vehicle-registry"
# When the vehicles load tools write straight into billing's tables were proven: before any
# stay they report, so their drivers see every parking.
PROVEN_LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)
VIN_ALPHABET = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O or Q, as in real VINs


class Http(Protocol):
    def post(self, url: str, *, json: Any = ..., headers: Any = ...) -> Any: ...


def vin_for(plate: str, plate_color: str = "blue") -> str:
    """A stable 17-character VIN for a test plate."""
    digest = hashlib.sha256(f"{plate}:{plate_color}".encode()).digest()
    return "".join(VIN_ALPHABET[b % len(VIN_ALPHABET)] for b in digest[:17])


def register_in_registry(
    http: Http,
    plate: str,
    plate_color: str = "blue",
    *,
    owner_name: str = "测试车主",
    vin: str | None = None,
    registry: str = EMBEDDED_REGISTRY,
) -> str:
    """Put the car on the sandbox register (again: a change of owner); returns its VIN."""
    vin = vin or vin_for(plate, plate_color)
    answer = http.post(
        f"{registry.rstrip('/')}/v1/vehicles",
        json={"plate": plate, "plate_color": plate_color, "owner_name": owner_name, "vin": vin},
    )
    assert answer.status_code == 201, answer.text
    return vin


def verify(
    http: Http,
    me: dict[str, str],
    vehicle_id: str,
    *,
    owner_name: str,
    vin: str,
) -> Any:
    """`POST /v1/me/vehicles/{id}/verification`: the response, whatever it is."""
    return http.post(
        f"/v1/me/vehicles/{vehicle_id}/verification",
        headers=me,
        json={"owner_name": owner_name, "vin_last6": vin[-6:]},
    )


def add_verified_vehicle(
    http: Http,
    me: dict[str, str],
    plate: str,
    plate_color: str = "blue",
    *,
    owner_name: str = "测试车主",
    registry: str = EMBEDDED_REGISTRY,
) -> dict[str, Any]:
    """Register the plate to the driver (`me`: their auth headers), put it on the sandbox
    register and prove ownership; returns the verified vehicle."""
    added = http.post(
        "/v1/me/vehicles", headers=me, json={"plate": plate, "plate_color": plate_color}
    )
    assert added.status_code == 201, added.text
    vin = register_in_registry(http, plate, plate_color, owner_name=owner_name, registry=registry)
    proved = verify(http, me, added.json()["id"], owner_name=owner_name, vin=vin)
    assert proved.status_code == 200, proved.text
    vehicle: dict[str, Any] = proved.json()
    assert vehicle["status"] == "verified", vehicle
    return vehicle


def backdate_verification(
    factory: sessionmaker[Session], vehicle_id: str, verified_at: datetime
) -> None:
    """Pretend the proof was made at `verified_at`: for tests that report stays late (replays
    up to 7 days old), whose drivers see only parkings that began after the proof."""
    from services.billing.vehicle.models import Vehicle

    with factory.begin() as db:
        db.execute(update(Vehicle).where(Vehicle.id == vehicle_id).values(verified_at=verified_at))


def proven_row(
    driver_id: str, plate: str, plate_color: str = "blue", *, settings: Any = None
) -> dict[str, Any]:
    """A billing vehicle row, verified long ago, for seeding with `insert(Vehicle)`. Core
    inserts bypass the ORM's blind indexing: `settings` (the data keys) give the plate's."""
    from shared.pii_columns import index_of

    return {
        "id": str(uuid.uuid4()),
        "driver_id": driver_id,
        "plate": plate,
        "plate_color": plate_color,
        "status": "verified",
        "verified_at": PROVEN_LONG_AGO,
        **({"plate_bidx": index_of(settings, "plate", plate)} if settings is not None else {}),
    }


def proven_vehicle(driver_id: str, plate: str, plate_color: str = "blue") -> Any:
    """The same as a model instance, for `db.add`."""
    from services.billing.vehicle.models import Vehicle

    return Vehicle(**proven_row(driver_id, plate, plate_color))
