"""CityPark load shapes (locust). Pick with tags or `--class-picker`:

* ConnectorUser (tag `connector`): car parks — signed entries, then exits after a dwell.
* GateUser (tag `gate`): exits of enrolled vehicles only — the gate decision path.
* DriverUser (tag `driver`): sign in once, then me, sessions, charges, quotes, nearby lots.
* OpsUser (tag `ops`): city stats and session searches.
* BaselineUser (tag `baseline`): the bare FastAPI endpoint of loadtests/baseline_app.py.

Needs `CITYPARK_LOAD_MANIFEST` (written by `python -m loadtests.bench seed`) and, for drivers and
ops, `CITYPARK_LOAD_ADMIN_TOKEN`.
"""

from __future__ import annotations

import json
import os
import random
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from citypark_connector import sign_request
from locust import FastHttpUser, between, constant, tag, task

from loadtests.seed import LotKey, Manifest, plate

_MANIFEST: Manifest | None = None


def manifest() -> Manifest:
    global _MANIFEST
    if _MANIFEST is None:
        _MANIFEST = Manifest.load(Path(os.environ["CITYPARK_LOAD_MANIFEST"]))
    return _MANIFEST


def signed(lot: LotKey, method: str, path: str, body: Any) -> tuple[bytes, dict[str, str]]:
    """Sign exactly as a connector does (the SDK's signing code), for any HTTP client."""
    request = sign_request(
        httpx.Request(method, f"http://gateway{path}", json=body), lot.key_id, lot.private_pem
    )
    headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
    return request.content, headers


def now_iso(delta_min: float = 0) -> str:
    return (datetime.now(UTC) - timedelta(minutes=delta_min)).isoformat()


class ConnectorUser(FastHttpUser):
    """A car park's gate: an entry, then the exit after a dwell (reported in time)."""

    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.lot = random.choice(manifest().lots)

    def _post(self, path: str, body: dict[str, Any], name: str) -> None:
        content, headers = signed(self.lot, "POST", path, body)
        with self.client.post(
            path, data=content, headers=headers, name=name, catch_response=True
        ) as r:
            if r.status_code >= 400:
                r.failure(f"{r.status_code} {(r.text or '')[:200]}")

    @tag("connector")
    @task
    def parking(self) -> None:
        m = manifest()
        enrolled = random.random() < 0.6 and m.enrolled_plates
        p = (
            random.choice(m.enrolled_plates)
            if enrolled
            else plate(random.randrange(10**6), city="A")
        )
        dwell = random.choice(
            [random.uniform(5, 120), random.uniform(120, 600), random.uniform(600, 3000)]
        )
        base = {"plate": p, "plate_color": "blue", "lane": "1"}
        self._post(
            "/v1/connector/entries",
            {
                **base,
                "event_id": str(uuid.uuid4()),
                "vehicle_type": "small",
                "occurred_at": now_iso(dwell),
            },
            "entry",
        )
        self._post(
            "/v1/connector/exits",
            {**base, "event_id": str(uuid.uuid4()), "occurred_at": now_iso()},
            "exit",
        )


class GateUser(FastHttpUser):
    """Only the gate decision: exits of enrolled vehicles."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.lot = random.choice(manifest().lots)

    @tag("gate")
    @task
    def exit_gate(self) -> None:
        body = {
            "event_id": str(uuid.uuid4()),
            "plate": random.choice(manifest().enrolled_plates),
            "plate_color": "blue",
            "occurred_at": now_iso(),
            "lane": "1",
        }
        content, headers = signed(self.lot, "POST", "/v1/connector/exits", body)
        with self.client.post(
            "/v1/connector/exits",
            data=content,
            headers=headers,
            name="exit (gate decision)",
            catch_response=True,
        ) as r:
            if r.status_code != 200 or json.loads(r.content)["decision"] != "postpay":
                r.failure(f"{r.status_code} {(r.text or '')[:200]}")


class BaselineUser(FastHttpUser):
    """The same request shape against a bare FastAPI endpoint (no signature, no Kafka)."""

    wait_time = constant(0)

    @tag("baseline")
    @task
    def exit_baseline(self) -> None:
        body = {
            "event_id": str(uuid.uuid4()),
            "plate": "苏E12345",
            "plate_color": "blue",
            "occurred_at": now_iso(),
            "lane": "1",
        }
        self.client.post("/v1/connector/exits", json=body, name="exit (baseline)")


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {os.environ['CITYPARK_LOAD_ADMIN_TOKEN']}"}


class DriverUser(FastHttpUser):
    """A driver with the app open: profile, parkings, charges, quotes, car parks nearby."""

    wait_time = between(0.5, 2)

    def on_start(self) -> None:
        phone = f"186{random.randrange(10**8):08d}"
        self.client.post("/v1/auth/otp", json={"phone": phone}, name="auth otp")
        sms = self.client.get(
            f"/v1/admin/sandbox/sms?phone={phone}", headers=_admin(), name="sandbox sms"
        ).json()
        code = re.search(r"\d{6}", sms[0]["body"]).group(0)  # type: ignore[union-attr]
        token = self.client.post(
            "/v1/auth/token", json={"phone": phone, "code": code}, name="auth token"
        ).json()["access_token"]
        self.auth = {"Authorization": f"Bearer {token}"}

    @tag("driver")
    @task(3)
    def me(self) -> None:
        self.client.get("/v1/me", headers=self.auth, name="me")

    @tag("driver")
    @task(2)
    def sessions(self) -> None:
        self.client.get("/v1/me/sessions", headers=self.auth, name="me sessions")

    @tag("driver")
    @task(2)
    def charges(self) -> None:
        self.client.get("/v1/me/charges", headers=self.auth, name="me charges")

    @tag("driver")
    @task(1)
    def quote(self) -> None:
        lot = random.choice(manifest().lots)
        self.client.post(
            "/v1/quotes",
            name="quote",
            json={
                "lot_id": lot.lot_id,
                "entered_at": now_iso(random.uniform(10, 600)),
                "exited_at": now_iso(),
                "vehicle_type": "small",
                "plate_color": "blue",
            },
        )

    @tag("driver")
    @task(2)
    def nearby(self) -> None:
        self.client.get("/v1/lots?near=31.30,120.60&radius_m=3000", name="lots nearby")


class OpsUser(FastHttpUser):
    wait_time = between(1, 3)

    @tag("ops")
    @task(2)
    def stats(self) -> None:
        self.client.get("/v1/admin/stats", headers=_admin(), name="admin stats")

    @tag("ops")
    @task(1)
    def search(self) -> None:
        self.client.get("/v1/admin/sessions?limit=50", headers=_admin(), name="admin sessions")
