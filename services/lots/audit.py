"""The city's one audit log: every admin and finance write of every service, with who did it,
why when asked, and the state before and after.

The registry's own writes are recorded here directly, in the write's transaction (service
`lots`); the other services put theirs on the audit topic through their outbox (shared/audit),
and `store` keeps each of those events once, keyed by its event id, however often it arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.lots.models import AuditEntry
from shared.audit import AdminWrite
from shared.auth import Admin
from shared.events import CloudEvent

SERVICE = "lots"


def record(
    db: Session,
    actor: Admin,
    action: str,
    entity: str,
    entity_id: str,
    *,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    reason: str | None = None,
) -> AuditEntry:
    """Append one entry in the caller's transaction, so a write and its record stand or fall
    together."""
    entry = AuditEntry(
        service=SERVICE,
        actor=actor.id,
        role=actor.role.value,
        action=action,
        entity=entity,
        entity_id=entity_id,
        before=before,
        after=after,
        reason=reason,
    )
    db.add(entry)
    db.flush()
    return entry


def record_entry(
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
    """shared/audit.record's shape, written straight to the log (the registry has no relay of
    its own outbox, and the log is here anyway)."""
    record(db, actor, action, entity, entity_id, before=before, after=after, reason=reason)


def store(db: Session, events: list[CloudEvent]) -> int:
    """Keep audit events from the topic, each once: an event id already in the log (a
    redelivery, a replay) is skipped by the unique index. Returns how many were new."""
    rows: dict[str, dict[str, Any]] = {}
    for event in events:
        write = AdminWrite.model_validate(event.data)
        rows[event.id] = {
            "event_id": event.id,
            "at": event.time,
            "service": write.service[:20],
            "actor": write.actor[:64],
            "role": write.role[:20],
            "action": write.action[:60],
            "entity": write.entity[:40],
            "entity_id": write.entity_id[:200],
            "before": write.before,
            "after": write.after,
            "reason": write.reason[:500] if write.reason else None,
        }
    if not rows:
        return 0
    dialect = db.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(AuditEntry)
        .values(list(rows.values()))
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(AuditEntry.id)
    )
    return len(db.scalars(stmt).all())


def entries(
    db: Session,
    *,
    service: str | None = None,
    entity: str | None = None,
    entity_id: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> Sequence[AuditEntry]:
    """Newest first; `before_id` continues a page (keyset on the append-only id); `since`
    inclusive, `until` exclusive."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if service is not None:
        query = query.where(AuditEntry.service == service)
    if entity is not None:
        query = query.where(AuditEntry.entity == entity)
    if entity_id is not None:
        query = query.where(AuditEntry.entity_id == entity_id)
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    if until is not None:
        query = query.where(AuditEntry.at < until)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    return db.scalars(query).all()
