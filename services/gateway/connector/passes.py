"""Passes at the gateway: relay what car parks push to the lots service, decide `free`.

The lots service owns passes (they change prices). The gateway keeps a Redis view per lot,
filled from lots on first use and dropped on every write through this module:

  passes:<lot>:view     → JSON {version, passes} (the lot's live passes, for the SDK snapshot)
  passes:<lot>:refs     → set of the pseudonyms (`shared.pii.plate_ref`) of the vehicles
                          holding a pass there (the exit gate's test); never a plate
  passes:<lot>:gen      → counter bumped on every write, so that a view read from lots before
                          a write can never be stored after it (WATCH on the counter)

(`passes:<lot>` and `passes:<lot>:holders`, plates in clear, were an earlier layout: never
read, gone within VIEW_TTL_S or at the next `citypark gate rebuild`.)

At the exit gate only a holder costs anything more: one call to lots, which checks the whole
stay (from the entry time the gateway remembered) against the same windows billing uses.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import httpx
import redis
import structlog

from services.gateway.connector.auth import Caller
from services.gateway.connector.schemas import PassEntry, PassIn, PassOut
from services.gateway.gate import state
from shared.errors import (
    NotFound,
    PlateColorInvalid,
    PlateInvalid,
    Problem,
    UpstreamUnavailable,
    ValidationFailed,
    problem,
)
from shared.plates import normalize_plate, parse_plate_color
from shared.runtime import Runtime

log = structlog.get_logger(__name__)

P = "citypark:gw:passes:"
# Writes drop the view at once; the TTL only bounds how long a view outlives a lost write.
VIEW_TTL_S = 24 * 3600

PassValidityInvalid = problem(
    422, "pass_validity_invalid", "valid_to must lie after valid_from, at most 10 years on"
)
PassWindowInvalid = problem(422, "pass_window_invalid", "A window needs distinct HH:MM bounds")
PassIdInvalid = problem(
    422, "pass_id_invalid", "A pass id is 1-64 letters, digits or . _ : - characters"
)
PassUnknown = problem(404, "pass_unknown", "The car park has no pass with this id")

# What lots may answer about a pass; anything else is a breach of contract between us.
_RELAYED: dict[str, type[Problem]] = {
    cls.code: cls
    for cls in (
        PassValidityInvalid,
        PassWindowInvalid,
        PassIdInvalid,
        PassUnknown,
        PlateInvalid,
        PlateColorInvalid,
        ValidationFailed,
    )
}


def _lots(rt: Runtime, method: str, path: str, body: Any = None) -> Any:
    """Call lots, answering its pass problems as ours (the caller sent what lots refused)."""
    client = rt.internal("lots")
    try:
        response = client.http.request(method, path, json=body)
    except httpx.TransportError as exc:
        raise UpstreamUnavailable(f"lots unreachable: {exc!r}") from exc
    if 400 <= response.status_code < 500:
        try:
            doc = response.json()
        except ValueError:
            doc = {}
        cls = _RELAYED.get(str(doc.get("code")))
        if cls is None:
            raise UpstreamUnavailable(f"{method} {path} answered {response.status_code}")
        raise cls(str(doc.get("detail") or cls.title))
    if response.status_code >= 500:
        raise UpstreamUnavailable(f"{method} {path} answered {response.status_code}")
    return response.json() if response.content else None


def _keys(lot_id: str) -> tuple[str, str, str]:
    return f"{P}{lot_id}:view", f"{P}{lot_id}:refs", f"{P}{lot_id}:gen"


def _invalidate(r: redis.Redis, lot_id: str) -> None:
    view, holders, gen = _keys(lot_id)
    pipe = r.pipeline(transaction=True)
    pipe.incr(gen)
    pipe.delete(view, holders)
    pipe.execute()


_PASS_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _checked(pass_id: str) -> str:
    """The id as it may go into the lots service's URL: never a dot segment, `?` or `/`."""
    if not _PASS_ID.fullmatch(pass_id) or pass_id in (".", ".."):
        raise PassIdInvalid("A pass id is 1-64 letters, digits or . _ : - characters")
    return pass_id


def put(rt: Runtime, caller: Caller, pass_id: str, data: PassIn) -> PassOut:
    assert caller.lot_id
    pass_id = _checked(pass_id)
    body = data.model_dump(mode="json")
    # Normalised here so a bad plate is refused before anything is written.
    body["plate"] = normalize_plate(data.plate)
    body["plate_color"] = parse_plate_color(data.plate_color).value
    answer = _lots(rt, "PUT", f"/internal/lots/{caller.lot_id}/passes/{pass_id}", body)
    _invalidate(rt.redis, caller.lot_id)
    log.info("connector.pass_put", lot=caller.lot_code, pass_id=pass_id, status=answer["status"])
    return PassOut.model_validate(answer)


def delete(rt: Runtime, caller: Caller, pass_id: str) -> None:
    assert caller.lot_id
    pass_id = _checked(pass_id)
    _lots(rt, "DELETE", f"/internal/lots/{caller.lot_id}/passes/{pass_id}")
    _invalidate(rt.redis, caller.lot_id)
    log.info("connector.pass_deleted", lot=caller.lot_code, pass_id=pass_id)


def _entry(p: dict[str, Any]) -> PassEntry:
    return PassEntry(
        pass_id=p["pass_id"],
        vehicle=state.plate_hash(p["plate"], p["plate_color"]),
        kind=p["kind"],
        valid_from=p["valid_from"],
        valid_to=p["valid_to"],
        window=p["window"],
        time_zone=p["time_zone"],
    )


def view(rt: Runtime, lot_id: str) -> tuple[int, list[PassEntry]]:
    """The lot's live passes (version, hashed entries), from Redis or else from lots."""
    r = rt.redis
    view_key, holders_key, gen_key = _keys(lot_id)
    raw = r.get(view_key)
    if raw is None:
        raw = _load(rt, lot_id, view_key, holders_key, gen_key)
    doc = json.loads(raw)
    return int(doc["version"]), [PassEntry.model_validate(e) for e in doc["passes"]]


def _load(rt: Runtime, lot_id: str, view_key: str, holders_key: str, gen_key: str) -> str:
    r = rt.redis
    gen_before = r.get(gen_key)
    found = _lots(rt, "GET", f"/internal/lots/{lot_id}/passes")
    raw = json.dumps(
        {
            "version": found["version"],
            "passes": [_entry(p).model_dump(mode="json") for p in found["passes"]],
        }
    )
    holders = {state.ref(rt.settings, p["plate"], p["plate_color"]) for p in found["passes"]}
    with r.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(gen_key)
            if pipe.get(gen_key) != gen_before:
                return raw  # a write came in meanwhile: answer, but do not keep it
            pipe.multi()
            pipe.set(view_key, raw, ex=VIEW_TTL_S)
            pipe.delete(holders_key)
            if holders:
                pipe.sadd(holders_key, *holders)
                pipe.expire(holders_key, VIEW_TTL_S)
            pipe.execute()
        except redis.WatchError:
            pass  # same as above: a newer write owns the next load
    return raw


def _holds_pass(rt: Runtime, lot_id: str, plate: str, color: str) -> bool:
    view_key, holders_key, _ = _keys(lot_id)
    pipe = rt.redis.pipeline(transaction=False)
    pipe.exists(view_key)
    pipe.sismember(holders_key, state.ref(rt.settings, plate, color))
    loaded, holds = pipe.execute()
    if loaded:
        return bool(holds)
    _, entries = view(rt, lot_id)
    wanted = state.plate_hash(plate, color)
    return any(e.vehicle == wanted for e in entries)


def free_reason(
    rt: Runtime, lot_id: str, plate: str, color: str, exited_at: datetime
) -> str | None:
    """`pass` or `whitelist` when the vehicle's passes cover its whole stay, else None.

    The stay runs from the entry the gateway saw; without one (reported elsewhere, or long
    ago) only the exit instant is judged. Lots away → no `free`: the gate falls back to
    post-pay, and billing still prices the stay with the passes."""
    try:
        if not _holds_pass(rt, lot_id, plate, color):
            return None
        entered_at = state.entered_at(rt.redis, rt.settings, lot_id, plate, color)
        if entered_at is None or entered_at > exited_at:
            entered_at = exited_at
        answer = _lots(
            rt,
            "POST",
            f"/internal/lots/{lot_id}/passes/cover",
            {
                "plate": plate,
                "plate_color": color,
                "entered_at": entered_at.isoformat(),
                "exited_at": exited_at.isoformat(),
            },
        )
    except (UpstreamUnavailable, NotFound) as exc:
        log.warning("connector.pass_check_failed", lot_id=lot_id, error=str(exc))
        return None
    if not answer["covered"]:
        return None
    return "whitelist" if answer["reason"] == "whitelist" else "pass"
