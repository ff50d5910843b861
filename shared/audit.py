"""One audit log for the whole city: every admin and finance write, in every service.

A service records the write in its own transaction (through its outbox), so the write and its
record stand or fall together; the lots service keeps the log (`GET /v1/admin/audit`) and stores
each event once, however often it is delivered.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from sqlalchemy.orm import Session

from shared.auth import Admin
from shared.bus.outbox import enqueue
from shared.events import EventType, new_event
from shared.topics import AUDIT_EVENTS


class AdminWrite(BaseModel):
    """The payload of one audit event."""

    service: str
    actor: str
    role: str
    action: str
    entity: str
    entity_id: str
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    reason: str | None = None


def record(
    db: Session,
    actor: Admin,
    *,
    service: str,
    action: str,
    entity: str,
    entity_id: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    reason: str | None = None,
) -> None:
    """Append the audit event to the caller's transaction (`service` is the outbox source)."""
    data = AdminWrite(
        service=service,
        actor=actor.id,
        role=actor.role.value,
        action=action,
        entity=entity,
        entity_id=entity_id,
        before=before,
        after=after,
        reason=reason,
    )
    event = new_event(EventType.admin_write, source=service, data=data, subject=entity_id)
    enqueue(db, source=service, topic=AUDIT_EVENTS, key=f"{entity}:{entity_id}", event=event)
