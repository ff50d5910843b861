"""A synchronous client for CityPark's connector API (SPEC §4)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ._signing import SignatureAuth
from ._version import __version__

PlateColor = Literal["blue", "yellow", "green", "white", "black"]
VehicleType = Literal["small", "large"]

_REQUEST_ID_HEADER = "x-request-id"


class ConnectorError(Exception):
    """CityPark answered 4xx/5xx; `code` is the stable problem code (e.g. `signature_invalid`)."""

    def __init__(
        self, http_status: int, code: str, detail: str, request_id: str | None = None
    ) -> None:
        self.http_status = http_status
        self.code = code
        self.detail = detail
        self.request_id = request_id
        super().__init__(f"{http_status} {code}: {detail}")


@dataclass(frozen=True)
class EntryResult:
    event_id: str
    status: str  # "accepted", or "duplicate" when the event_id was seen before


@dataclass(frozen=True)
class ExitResult:
    event_id: str
    decision: str  # "postpay", "pay_on_site" or "free"
    reason: str | None
    session_id: str | None


class ConnectorClient:
    """Signs every request with the lot's Ed25519 key and reports gate events to CityPark."""

    def __init__(
        self,
        key_id: str,
        private_key: str | Ed25519PrivateKey,
        *,
        base_url: str,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.key_id = key_id
        self._http = httpx.Client(
            base_url=base_url,
            timeout=timeout,
            auth=SignatureAuth(key_id, private_key),
            transport=transport,
            headers={"user-agent": f"citypark-connector/{__version__}"},
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> httpx.Response:
        """Send a signed request; raise `ConnectorError` on a 4xx/5xx answer."""
        response = self._http.request(method, path, json=json, params=params)
        if response.is_error:
            raise _error_from(response)
        return response

    def report_entry(
        self,
        *,
        plate: str,
        plate_color: PlateColor,
        vehicle_type: VehicleType,
        lane: str,
        occurred_at: datetime | None = None,
        event_id: uuid.UUID | str | None = None,
    ) -> EntryResult:
        """Report a vehicle entering; safe to repeat with the same `event_id`."""
        body = _event_body(event_id, occurred_at) | {
            "plate": plate,
            "plate_color": plate_color,
            "vehicle_type": vehicle_type,
            "lane": lane,
        }
        data = _json_object(self.request("POST", "/v1/connector/entries", json=body))
        return EntryResult(event_id=str(data["event_id"]), status=str(data["status"]))

    def report_exit(
        self,
        *,
        plate: str,
        plate_color: PlateColor,
        lane: str,
        occurred_at: datetime | None = None,
        event_id: uuid.UUID | str | None = None,
    ) -> ExitResult:
        """Report a vehicle at the exit gate and get the gate decision."""
        body = _event_body(event_id, occurred_at) | {
            "plate": plate,
            "plate_color": plate_color,
            "lane": lane,
        }
        data = _json_object(self.request("POST", "/v1/connector/exits", json=body))
        reason, session_id = data.get("reason"), data.get("session_id")
        return ExitResult(
            event_id=str(data["event_id"]),
            decision=str(data["decision"]),
            reason=None if reason is None else str(reason),
            session_id=None if session_id is None else str(session_id),
        )

    def heartbeat(self, *, free_spaces: int, total_spaces: int) -> None:
        """Report occupancy; also tells CityPark the connector is alive."""
        self.request(
            "POST",
            "/v1/connector/heartbeats",
            json={
                "free_spaces": free_spaces,
                "total_spaces": total_spaces,
                "sdk_version": __version__,
            },
        )


def _event_body(event_id: uuid.UUID | str | None, occurred_at: datetime | None) -> dict[str, Any]:
    when = datetime.now(UTC) if occurred_at is None else occurred_at
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("occurred_at must be timezone-aware (RFC 3339 needs an offset)")
    return {
        "event_id": str(uuid.uuid4() if event_id is None else uuid.UUID(str(event_id))),
        "occurred_at": when.isoformat(),
    }


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ConnectorError(
            response.status_code,
            "invalid_response",
            "CityPark answered with a body that is not a JSON object",
            response.headers.get(_REQUEST_ID_HEADER),
        )
    return data


def _error_from(response: httpx.Response) -> ConnectorError:
    """Read the RFC 9457 problem document; fall back to the status line for anything else."""
    try:
        data = response.json()
    except ValueError:
        data = None
    problem: dict[str, Any] = data if isinstance(data, dict) else {}
    code = problem.get("code")
    detail = problem.get("detail") or problem.get("title") or response.reason_phrase
    request_id = response.headers.get(_REQUEST_ID_HEADER) or problem.get("request_id")
    return ConnectorError(
        response.status_code,
        code if isinstance(code, str) else f"http_{response.status_code}",
        str(detail),
        None if request_id is None else str(request_id),
    )
