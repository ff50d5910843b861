"""Signed asynchronous notifications, delivered until acknowledged.

Scheme (documented in docs/billing.md): header `X-Sandbox-Signature: t=<unix seconds>,v1=<hex>`
where `<hex>` is HMAC-SHA256 under the shared notify secret of `"<t>.<raw body>"`. HMAC rather
than Ed25519 because the sandbox and the platform share one secret store; the receiver rejects
a timestamp more than 300 s away, so a captured notification cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from datetime import timedelta
from typing import Any

import httpx
import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.paysandbox.models import SandboxNotification
from shared import workqueue
from shared.keys import Purpose, derive_hex
from shared.settings import Settings
from shared.timeutil import utcnow

log = structlog.get_logger(__name__)
# One client for every delivery: connections to the receiver are kept alive, not opened anew
# per notification (a connection per notice cost the sandbox more CPU than the charge itself).
_http = httpx.Client()

SIGNATURE_HEADER = "X-Sandbox-Signature"
MAX_BACKOFF_S = 300


def notify_secret(settings: Settings) -> str:
    if settings.paysandbox_notify_secret is not None:
        return settings.paysandbox_notify_secret.get_secret_value()
    return derive_hex(settings.jwt_secret.get_secret_value(), Purpose.paysandbox_notify)


def sign(secret: str, body: bytes, at: int | None = None) -> str:
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def enqueue(db: Session, *, url: str | None, payload: dict[str, Any], copies: int = 1) -> None:
    """Queue a notification in the caller's transaction: it leaves only once that commits."""
    if not url:
        return
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    for _ in range(copies):
        db.add(SandboxNotification(notify_id=payload["notify_id"], url=url, body=body))


def deliver_due(
    factory: sessionmaker[Session], secret: str, *, limit: int = 20, timeout_s: float = 10.0
) -> int:
    """Try every due notification once; returns how many were acknowledged. The batch is
    taken with a lease, and each is posted with no transaction open (the receiver may be this
    very process, writing to the same database)."""
    with factory() as db, db.begin():
        ids = workqueue.claim_due(
            db,
            SandboxNotification.id,
            SandboxNotification.next_attempt_at,
            SandboxNotification.delivered_at.is_(None),
            limit=limit,
            lease=timedelta(seconds=timeout_s + 20),
        )
        posts = {
            row.id: (row.url, row.body.encode())
            for row in db.scalars(
                select(SandboxNotification).where(SandboxNotification.id.in_(ids))
            )
        }
    acked = 0
    for nid in ids:
        url, body = posts[nid]
        try:
            answer = _http.post(
                url,
                content=body,
                headers={"content-type": "application/json", SIGNATURE_HEADER: sign(secret, body)},
                timeout=timeout_s,
            )
            ok, error = answer.is_success, f"HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            ok, error = False, repr(exc)[:300]
        with factory() as db, db.begin():
            row = workqueue.locked(db, SandboxNotification, nid)
            if row is None or row.delivered_at is not None:
                continue
            row.attempts += 1
            if ok:
                row.delivered_at = utcnow()
                acked += 1
            else:
                # Retried until acknowledged, backing off like a real provider does.
                row.last_error = error
                row.next_attempt_at = utcnow() + timedelta(
                    seconds=min(2 ** min(row.attempts, 9), MAX_BACKOFF_S)
                )
                log.info("paysandbox.notify_failed", notify_id=row.notify_id, error=error)
    return acked


def run_delivery(factory: sessionmaker[Session], secret: str, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            sent = deliver_due(factory, secret)
        except Exception:
            log.exception("paysandbox.notify_loop_failed")
            sent = 0
        if not sent:
            stop.wait(0.2)
