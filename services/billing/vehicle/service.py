"""Vehicles: a driver claims a plate, then proves ownership against the vehicle registry.

An unverified claim shows nothing of the car and never opens post-pay, so registering a
stranger's plate reveals nothing and blocks nobody: any number of drivers may claim a plate.
A verified claim takes the plate over from whoever held it verified before (they are told),
since the registry has just said the car is the new driver's. Verifications of one plate are
serialised by locking all its claims, so at most one driver holds it verified at a time.
"""

from __future__ import annotations

from datetime import datetime

import redis
import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.billing.driver import service as drivers
from services.billing.notification import service as notifications
from services.billing.notification import texts
from services.billing.notification.models import NotificationKind
from services.billing.vehicle.models import Vehicle, VehicleStatus
from services.billing.vehicle.registry import RegistryUnavailable, VehicleRegistry
from services.billing.vehicle.schemas import VerifiedWindow
from shared.errors import NotFound, RateLimited, problem
from shared.pii_columns import index_in
from shared.plates import mask_plate_for_message, normalize_plate, parse_plate_color
from shared.settings import Settings
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)

VehicleExists = problem(409, "vehicle_exists", "This vehicle is already on your account")
VehicleClaimsExceeded = problem(
    409, "vehicle_claims_exceeded", "Too many unverified vehicles; verify or remove one first"
)
VerificationFailed = problem(
    422,
    "vehicle_verification_failed",
    "The vehicle registry does not confirm this owner and VIN for the plate",
)
RegistryDown = problem(503, "dependency_unavailable", "The vehicle registry is unavailable")

MAX_UNVERIFIED = 5  # claims a driver may hold unproven at once
FAILED_PER_HOUR = 10  # wrong owner/VIN answers a driver gets per hour (VIN endings are short)


def vehicles_of(db: Session, driver_id: str) -> list[Vehicle]:
    return list(
        db.scalars(
            select(Vehicle).where(Vehicle.driver_id == driver_id).order_by(Vehicle.created_at)
        )
    )


def own_vehicle(db: Session, driver_id: str, vehicle_id: str) -> Vehicle:
    vehicle = db.get(Vehicle, vehicle_id)
    if vehicle is None or vehicle.driver_id != driver_id:
        raise NotFound("No such vehicle")  # another driver's is indistinguishable from none
    return vehicle


def verified_of(db: Session, driver_id: str) -> list[Vehicle]:
    return [v for v in vehicles_of(db, driver_id) if v.status == VehicleStatus.verified]


def verified_windows(db: Session, driver_id: str) -> list[VerifiedWindow]:
    """When the driver held each plate verified; a removed vehicle has no window left."""
    return [
        VerifiedWindow(
            plate=v.plate,
            plate_color=v.plate_color,
            verified_at=v.verified_at,
            until=v.superseded_at if v.status == VehicleStatus.superseded else None,
        )
        for v in vehicles_of(db, driver_id)
        if v.verified_at is not None
    ]


def verified_holder(db: Session, plate: str, color: str, at: datetime) -> Vehicle | None:
    """The claim that held the plate verified at `at`, if any."""
    for v in db.scalars(
        select(Vehicle).where(
            Vehicle.plate_bidx == index_in(db, "plate", plate),
            Vehicle.plate_color == color,
            Vehicle.verified_at.is_not(None),
            Vehicle.verified_at <= at,
        )
    ):
        if v.status == VehicleStatus.verified or (
            v.superseded_at is not None and at < v.superseded_at
        ):
            return v
    return None


def add_vehicle(
    db: Session, settings: Settings, driver_id: str, plate_raw: str, color_raw: str
) -> Vehicle:
    """An unverified claim. Another driver's claim, verified or not, does not block it: the
    proof decides (409 only when the driver already claims the plate)."""
    plate = normalize_plate(plate_raw)
    color = parse_plate_color(color_raw).value
    driver = drivers.get_driver(db, driver_id)
    mine = db.scalar(
        select(Vehicle).where(
            Vehicle.driver_id == driver_id,
            Vehicle.plate_bidx == index_in(db, "plate", plate),
            Vehicle.plate_color == color,
        )
    )
    if mine is not None and mine.status != VehicleStatus.superseded:
        raise VehicleExists(f"{plate} is already registered to you")
    pending = (
        db.scalar(
            select(func.count())
            .select_from(Vehicle)
            .where(Vehicle.driver_id == driver_id, Vehicle.status == VehicleStatus.unverified)
        )
        or 0
    )
    if pending >= MAX_UNVERIFIED:
        raise VehicleClaimsExceeded(f"At most {MAX_UNVERIFIED} vehicles may await verification")
    if mine is not None:  # claimed again after another driver took it over: a fresh claim
        mine.status = VehicleStatus.unverified
        mine.verified_at = mine.superseded_at = None
        mine.created_at = utcnow()
        vehicle = mine
    else:
        vehicle = Vehicle(driver_id=driver_id, plate=plate, plate_color=color)
        db.add(vehicle)
    try:
        db.flush()
    except IntegrityError as exc:  # the same driver's concurrent registration won the race
        raise VehicleExists(f"{plate} is already registered to you") from exc
    drivers.publish_account_state(db, settings, driver)
    log.info("vehicle.claimed", driver_id=driver_id, vehicle_id=vehicle.id)
    return vehicle


def _count_failure(cache: redis.Redis | None, driver_id: str) -> None:
    if cache is None:
        return
    key = f"citypark:billing:vehicle-verify-failed:{driver_id}"
    failures = int(cache.incr(key))  # type: ignore[arg-type]
    if failures == 1:
        cache.expire(key, 3600)


def _check_failures(cache: redis.Redis | None, driver_id: str) -> None:
    if cache is None:
        return
    failures = cache.get(f"citypark:billing:vehicle-verify-failed:{driver_id}")
    if failures is not None and int(failures) >= FAILED_PER_HOUR:  # type: ignore[arg-type]
        raise RateLimited(f"At most {FAILED_PER_HOUR} failed verifications per hour")


def check_with_registry(
    registry: VehicleRegistry,
    cache: redis.Redis | None,
    vehicle: Vehicle,
    owner_name: str,
    vin_last6: str,
) -> bool:
    """Ask the registry (outside any lock: it is a network call). A wrong answer counts
    against the driver's hourly allowance, so VIN endings cannot be guessed through us."""
    _check_failures(cache, vehicle.driver_id)
    try:
        ok = registry.matches(
            plate=vehicle.plate,
            plate_color=vehicle.plate_color,
            owner_name=owner_name,
            vin_last6=vin_last6,
        )
    except RegistryUnavailable as exc:
        log.warning("vehicle.registry_unavailable", error=str(exc)[:200])
        raise RegistryDown("The vehicle registry did not answer; try again shortly") from exc
    if not ok:
        _count_failure(cache, vehicle.driver_id)
        log.info("vehicle.verification_failed", driver_id=vehicle.driver_id, vehicle_id=vehicle.id)
    return ok


def mark_verified(db: Session, settings: Settings, driver_id: str, vehicle_id: str) -> Vehicle:
    """Make the driver's claim the verified one, taking the plate from its previous holder."""
    claim = own_vehicle(db, driver_id, vehicle_id)
    # Every claim of the plate, locked: a concurrent verification of the same plate waits
    # here and then sees this one as the holder to supersede.
    claims = list(
        db.scalars(
            select(Vehicle)
            .where(Vehicle.plate_bidx == claim.plate_bidx, Vehicle.plate_color == claim.plate_color)
            .order_by(Vehicle.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    )
    if claim.status == VehicleStatus.verified:
        return claim
    now = utcnow()
    for other in claims:
        if other.id == claim.id or other.status != VehicleStatus.verified:
            continue
        other.status = VehicleStatus.superseded
        other.superseded_at = now
        db.flush()
        drivers.publish_account_state(db, settings, drivers.get_driver(db, other.driver_id))
        plate = mask_plate_for_message(other.plate)
        title, body = texts.vehicle_superseded(plate, now)
        notifications.notify(
            db,
            driver_id=other.driver_id,
            kind=NotificationKind.vehicle_superseded,
            key=f"vehicle_superseded:{other.id}:{now.isoformat()}",
            title=title,
            body=body,
            plate=plate,
            ref_id=other.id,
        )
        log.info(
            "vehicle.superseded",
            vehicle_id=other.id,
            previous_driver_id=other.driver_id,
            driver_id=driver_id,
        )
    claim.status = VehicleStatus.verified
    claim.verified_at = now
    claim.superseded_at = None
    db.flush()
    drivers.publish_account_state(db, settings, drivers.get_driver(db, driver_id))
    log.info("vehicle.verified", driver_id=driver_id, vehicle_id=claim.id)
    return claim


def verify_vehicle(
    db: Session,
    settings: Settings,
    registry: VehicleRegistry,
    cache: redis.Redis | None,
    driver_id: str,
    vehicle_id: str,
    owner_name: str,
    vin_last6: str,
) -> Vehicle:
    vehicle = own_vehicle(db, driver_id, vehicle_id)
    if vehicle.status == VehicleStatus.verified:
        return vehicle
    if not check_with_registry(registry, cache, vehicle, owner_name, vin_last6):
        raise VerificationFailed(
            "The registry does not hold this plate with this owner name and VIN ending"
        )
    return mark_verified(db, settings, driver_id, vehicle_id)


def remove_vehicle(db: Session, settings: Settings, driver_id: str, vehicle_id: str) -> None:
    vehicle = own_vehicle(db, driver_id, vehicle_id)
    db.delete(vehicle)
    db.flush()
    drivers.publish_account_state(db, settings, drivers.get_driver(db, driver_id))
