"""The notification port: channels that carry a notification to a driver.

`SmsSandbox` writes to the sandbox SMS outbox admins read (the same one sign-in codes use);
`WebhookChannel` posts signed JSON to the driver's URL, after checking again that it leads to a
public address (`urlguard`). A channel raises `DeliveryFailed` on anything but an
acknowledgement; the delivery worker retries with backoff, so a notification arrives at least
once (receivers dedupe on the `webhook-id` header).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any, Protocol

import httpx
import structlog
from sqlalchemy.orm import Session

from services.billing.driver.models import SmsMessage
from services.billing.notification.models import Notification
from services.billing.notification.urlguard import UrlGuard
from shared.errors import Problem
from shared.keys import Purpose, derive
from shared.plates import mask_plate

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "x-citypark-signature"
TOLERANCE_S = 300


class DeliveryFailed(Exception):
    pass


class NotificationChannel(Protocol):
    # A channel that writes its message into the database (the SMS sandbox) sends inside the
    # delivery's transaction; one that talks to the network sends with no transaction open.
    writes_to_db: bool

    def send(self, db: Session | None, notification: Notification, target: str) -> None: ...


class SmsSandbox:
    """The SMS port in sandbox mode: the message lands in `billing_sms`."""

    writes_to_db = True

    def send(self, db: Session | None, notification: Notification, target: str) -> None:
        assert db is not None, "the SMS sandbox writes its outbox in the delivery's transaction"
        db.add(SmsMessage(phone=target, body=f"【CityPark】{notification.body}"))


def webhook_secret(platform_secret: str, webhook_id: str) -> str:
    """Each registration's signing secret, derived so that none is stored: a new
    registration (a new id) is a new secret."""
    key = derive(platform_secret, Purpose.webhook_secrets)  # the master secret's webhook key
    mac = hmac.new(key, f"webhook:{webhook_id}".encode(), hashlib.sha256)
    return "whsec_" + mac.hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(
    secret: str,
    header: str,
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: int = TOLERANCE_S,
) -> bool:
    """What a receiver runs: the MAC matches and the timestamp is fresh (no replays)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def payload(notification: Notification) -> dict[str, Any]:
    # A webhook lands on a server the driver chose, run by someone else: it gets the plate as
    # other people see it (`苏E***45`), not the message form the driver reads (`苏E·12*45`), which
    # leaves a single character to guess.
    title, body, plate = notification.title, notification.body, notification.plate
    if plate:
        strict = mask_plate(plate)
        title, body, plate = title.replace(plate, strict), body.replace(plate, strict), strict
    return {
        "id": notification.id,
        "type": f"citypark.notification.{notification.kind}",
        "created_at": notification.created_at.isoformat(),
        "data": {
            "kind": str(notification.kind),
            "title": title,
            "body": body,
            "plate": plate,
            "amount_fen": notification.amount_fen,
            "ref_id": notification.ref_id,
        },
    }


class WebhookChannel:
    writes_to_db = False

    def __init__(self, platform_secret: str, guard: UrlGuard, *, timeout: float = 5.0) -> None:
        self.platform_secret = platform_secret
        self.guard = guard
        # Each request goes to the address the guard checked, under the URL's own name (Host
        # header, TLS SNI and certificate check): no pooled connection may be reused for
        # another name on the same address, and no proxy from the environment sits between.
        self.http = httpx.Client(
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def send(self, db: Session | None, notification: Notification, target: str) -> None:
        webhook_id, _, url = target.partition(" ")
        try:
            checked = self.guard.check(url)
        except Problem as exc:
            # DNS may have moved since registration (rebinding): nothing is sent.
            log.warning(
                "notification.webhook_refused",
                notification_id=notification.id,
                webhook_id=webhook_id,
                code=exc.code,
                reason=exc.detail,
            )
            raise DeliveryFailed(f"not sent, {exc.code}: {exc.detail}") from exc
        parsed = httpx.URL(url)
        body = json.dumps(payload(notification), ensure_ascii=False).encode()
        try:
            answer = self.http.post(
                parsed.copy_with(host=checked.address),
                content=body,
                headers={
                    "host": parsed.netloc.decode("ascii"),
                    "content-type": "application/json",
                    "webhook-id": notification.id,
                    SIGNATURE_HEADER: sign(webhook_secret(self.platform_secret, webhook_id), body),
                },
                extensions={"sni_hostname": checked.host},
                follow_redirects=False,
            )
        except httpx.HTTPError as exc:
            raise DeliveryFailed(repr(exc)[:300]) from exc
        if 300 <= answer.status_code < 400:
            raise DeliveryFailed(f"answered {answer.status_code}; redirects are not followed")
        if not 200 <= answer.status_code < 300:
            raise DeliveryFailed(f"answered {answer.status_code}")
