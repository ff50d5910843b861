"""Drivers' notifications: the list, muted kinds and the one webhook."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from services.billing.notification import service as notifications
from services.billing.notification.models import Webhook
from services.billing.notification.port import webhook_secret
from services.billing.notification.schemas import (
    DeliveryOut,
    NotificationOut,
    Preferences,
    WebhookIn,
    WebhookOut,
)
from services.billing.notification.urlguard import (
    UrlGuard,
    WebhookUrlForbidden,
    WebhookUrlUnresolvable,
)
from shared.auth import DriverAuth
from shared.deps import DbSession
from shared.errors import NotFound, ValidationFailed
from shared.http import problem_responses

me = APIRouter(prefix="/v1/me", tags=["driver: notifications"])


def _webhook_out(request: Request, hook: Webhook) -> WebhookOut:
    secret = request.app.state.runtime.secret
    return WebhookOut(
        id=hook.id, url=hook.url, secret=webhook_secret(secret, hook.id), created_at=hook.created_at
    )


@me.get("/notifications", response_model=list[NotificationOut])
def list_notifications(
    who: DriverAuth, db: DbSession, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> list[NotificationOut]:
    """What you were told, newest first: each event once, however often it was delivered,
    with how each channel fared."""
    items = notifications.list_for(db, who.id, limit)
    deliveries = notifications.deliveries_of(db, [n.id for n in items])
    return [
        NotificationOut.model_validate(n, from_attributes=True).model_copy(
            update={
                "deliveries": [
                    DeliveryOut.model_validate(d, from_attributes=True) for d in deliveries[n.id]
                ]
            }
        )
        for n in items
    ]


@me.get("/notifications/preferences", response_model=Preferences)
def get_preferences(who: DriverAuth, db: DbSession) -> Preferences:
    return Preferences(muted=sorted(notifications.muted_kinds(db, who.id)))


@me.put(
    "/notifications/preferences",
    response_model=Preferences,
    responses=problem_responses(ValidationFailed),
)
def put_preferences(data: Preferences, who: DriverAuth, db: DbSession) -> Preferences:
    """Mute kinds (`entry`, `exit`, `charge_captured`, `charge_declined`, `suspended`,
    `restored`, `refund`): they are neither listed nor sent while muted."""
    return Preferences(muted=notifications.set_muted(db, who.id, data.muted))


@me.put(
    "/webhook",
    response_model=WebhookOut,
    responses=problem_responses(ValidationFailed, WebhookUrlForbidden, WebhookUrlUnresolvable),
)
def put_webhook(data: WebhookIn, who: DriverAuth, db: DbSession, request: Request) -> WebhookOut:
    """Register your one webhook URL (replacing any other, with a new secret). Each
    notification is POSTed as JSON with `webhook-id` and `x-citypark-signature:
    t=<unix>,v1=<hex HMAC-SHA256 of "<t>." + body>`; answer 2xx, or it is retried (redirects
    are not followed). The URL must be `https` and its host a public name that resolves to
    public internet addresses only: anything else is `webhook_url_forbidden`, a name that
    does not resolve `webhook_url_unresolvable`."""
    url = str(data.url)
    if len(url) > 500:
        raise ValidationFailed("The URL is longer than 500 characters")
    guard = UrlGuard.from_runtime(request.app.state.runtime)
    return _webhook_out(request, notifications.register_webhook(db, who.id, url, guard))


@me.get("/webhook", response_model=WebhookOut, responses=problem_responses(NotFound))
def get_webhook(who: DriverAuth, db: DbSession, request: Request) -> WebhookOut:
    return _webhook_out(request, notifications.get_webhook(db, who.id))


@me.delete(
    "/webhook", status_code=status.HTTP_204_NO_CONTENT, responses=problem_responses(NotFound)
)
def delete_webhook(who: DriverAuth, db: DbSession) -> Response:
    notifications.remove_webhook(db, who.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
