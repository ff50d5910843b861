"""What staff see of people's data: one masking function per kind, and the rule of who sees what.

Rule (docs/security.md, "Roles"):

* plates and phones are masked for every staff role (viewer, finance and admin alike): staff
  work with ids and amounts, not with where a named car or person has been;
* an admin may ask one read for them unmasked (`unmasked=true`) with a `reason`; that look-up is
  audited before anything is read, so unmasked data is never shown without a record of who
  asked and why; viewer and finance asking are refused (403), without a reason it is 422;
* operators' bank accounts (`settlement_account`) are for finance and admin; viewer sees the
  last four characters at most.

Masking never fails: it runs on the way out, where an odd stored value must not become an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Final, Protocol

from fastapi import Query, Request
from sqlalchemy.orm import Session

from shared import audit, pii
from shared.auth import Admin, Role, ViewerAuth
from shared.errors import problem
from shared.http import answers
from shared.plates import PROVINCES
from shared.plates import mask_plate as _mask_plate
from shared.settings import Settings

__all__ = [
    "UNMASK_RESPONSES",
    "ReasonRequired",
    "UnmaskedForbidden",
    "View",
    "mask_account",
    "mask_doc",
    "mask_phone",
    "mask_plate",
    "mask_text",
    "open_lookup",
    "staff_view",
]

UnmaskedForbidden = problem(403, "unmasked_forbidden", "Only an admin may see unmasked data")
ReasonRequired = problem(422, "reason_required", "An unmasked look-up needs a reason")

PLATE_KEYS: Final[frozenset[str]] = frozenset({"plate", "cph"})
PHONE_KEYS: Final[frozenset[str]] = frozenset({"phone", "mobile"})
ACCOUNT_KEYS: Final[frozenset[str]] = frozenset({"settlement_account"})

_PROVINCE_CLASS = "".join(sorted(PROVINCES))
# A plate inside free text (an error message, an undecodable payload): province, issuing
# letter, an optional dot, a 5- or 6-character serial; a mobile number: 11 digits from 1.
_PLATE_IN_TEXT: Final[re.Pattern[str]] = re.compile(
    f"[{_PROVINCE_CLASS}][A-Za-z][·•\\s-]?[A-Za-z0-9]{{4,5}}[A-Za-z0-9挂学警港澳领]"
)
_PHONE_IN_TEXT: Final[re.Pattern[str]] = re.compile(r"(?<![0-9A-Za-z])1[3-9]\d{9}(?![0-9A-Za-z])")


def mask_plate(plate: str) -> str:
    """`苏E12345` → `苏E***45`: province, issuing letter and the last two stay (shared/plates)."""
    return _mask_plate(plate)


def mask_phone(phone: str) -> str:
    """`13912345678` → `139****5678`; anything shorter than 8 characters is hidden whole."""
    if not isinstance(phone, str):
        return "****"
    if len(phone) < 8:
        return "*" * len(phone)
    return phone[:3] + "****" + phone[-4:]


def mask_account(account: str) -> str:
    """`6222020200112233` → `****2233`; a short account would show too much: `****`."""
    if not isinstance(account, str) or len(account) < 8:
        return "****"
    return "****" + account[-4:]


def mask_text(text: str) -> str:
    """Mask plates and mobile numbers wherever they stand in free text."""
    text = _PLATE_IN_TEXT.sub(lambda m: mask_plate(m.group(0)), text)
    return _PHONE_IN_TEXT.sub(lambda m: mask_phone(m.group(0)), text)


def mask_doc(value: Any, *, accounts: bool = True) -> Any:
    """A copy of a JSON-like document with plates and phones masked under their keys and in any
    other text; `accounts` masks bank accounts too (for roles that may not see them)."""
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            name = key.lower() if isinstance(key, str) else key
            if isinstance(item, str) and name in PLATE_KEYS:
                out[key] = mask_plate(item)
            elif isinstance(item, str) and name in PHONE_KEYS:
                out[key] = mask_phone(item)
            elif isinstance(item, str) and accounts and name in ACCOUNT_KEYS:
                out[key] = mask_account(item)
            else:
                out[key] = mask_doc(item, accounts=accounts)
        return out
    if isinstance(value, list):
        return [mask_doc(item, accounts=accounts) for item in value]
    if isinstance(value, str):
        return mask_text(value)
    return value


def mask_json_text(text: str, *, accounts: bool = True) -> str:
    """A stored JSON document (a dead letter's payload) masked; text that is not JSON is masked
    as text. Unchanged documents keep their exact text."""
    try:
        doc = json.loads(text)
    except ValueError:
        return mask_text(text)
    masked = mask_doc(doc, accounts=accounts)
    return text if masked == doc else json.dumps(masked, ensure_ascii=False)


class Recorder(Protocol):
    """Writes one audit entry (shared/audit.record's signature)."""

    def __call__(
        self,
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
    ) -> None: ...


@dataclass(frozen=True)
class View:
    """What one staff request may see."""

    admin: Admin
    unmasked: bool = False

    @property
    def sees_accounts(self) -> bool:
        return self.unmasked or self.admin.role in (Role.admin, Role.finance)

    def require_lookup(self, what: str) -> None:
        """Searching by a full plate or phone is itself a look-up of one person (where their car
        parks, what they owe), even when the answer is masked: admins only, with a reason."""
        if self.unmasked:
            return
        if self.admin.role is not Role.admin:
            raise UnmaskedForbidden(f"Only an admin may search by {what}")
        raise ReasonRequired(f"Searching by {what} needs `unmasked=true` and a `reason`")

    def plate(self, plate: str) -> str:
        return plate if self.unmasked else mask_plate(plate)

    def phone(self, phone: str) -> str:
        return phone if self.unmasked else mask_phone(phone)

    def account(self, account: str) -> str:
        return account if self.sees_accounts else mask_account(account)

    def doc(self, value: Any) -> Any:
        return value if self.unmasked else mask_doc(value, accounts=not self.sees_accounts)

    def text(self, text: str) -> str:
        return text if self.unmasked else mask_text(text)

    def json_text(self, text: str) -> str:
        return text if self.unmasked else mask_json_text(text, accounts=not self.sees_accounts)


@contextmanager
def _writing(request: Request) -> Iterator[Session]:
    """A write transaction of its own: the read's session may be read-only (SQLite)."""
    state = request.app.state
    factory = getattr(state, "request_sessionmaker", None) or state.sessionmaker
    with factory() as db, db.begin():
        yield db


# An unmasked look-up's audit entry keeps its query masked (the audit topic carries no plate or
# phone) and, where masking changed it, the query as asked encrypted under this key.
SEALED_QUERY = "query_sealed"


def lookup_record(settings: Settings, path: str, query: dict[str, str]) -> dict[str, Any]:
    """The `after` of an unmasked look-up's audit entry: path and query with plates and phones
    masked, the query as asked sealed (shared.pii) for an admin's unmasked read of the log."""
    masked = mask_doc(query, accounts=False)
    after: dict[str, Any] = {"path": mask_text(path), "query": masked}
    if masked != query:
        after[SEALED_QUERY] = pii.encrypt(settings, json.dumps(query, ensure_ascii=False))
    return after


def open_lookup(settings: Settings, after: Any, *, unmasked: bool) -> Any:
    """An audit entry's `after` as a reader sees it: for an unmasked read the look-up's query as
    asked, else the masked copy alone. Never fails (an entry sealed under a key this process
    lacks keeps its masked query)."""
    if not isinstance(after, dict) or SEALED_QUERY not in after:
        return after
    out = {k: v for k, v in after.items() if k != SEALED_QUERY}
    if unmasked:
        try:
            out["query"] = json.loads(pii.decrypt(settings, str(after[SEALED_QUERY])))
        except (pii.DataKeyUnknown, ValueError):
            pass
    return out


UNMASK_DOC = "Show plates and phones in full (admins only, with a `reason`; audited)"
REASON_DOC = "Why the unmasked look-up is needed (3–500 characters); kept in the audit log"
# `staff_view` declares its problems itself (`answers`), so every route using it documents them;
# this stays for routes that still merge it into their `responses=` (merging could drop theirs).
UNMASK_RESPONSES: dict[int | str, dict[str, Any]] = {}


def staff_view(
    service: str, entity: str, *, record: Recorder = audit.record
) -> Callable[..., View]:
    """The dependency of a staff read: any staff role, with the `unmasked` and `reason` query
    parameters. An unmasked look-up is recorded (`lookup.unmasked`, with the reason, the path
    and the query) in a transaction of its own before the read runs: no record, no data."""

    def dependency(
        request: Request,
        admin: ViewerAuth,
        unmasked: Annotated[bool, Query(description=UNMASK_DOC)] = False,
        reason: Annotated[
            str | None, Query(min_length=3, max_length=500, description=REASON_DOC)
        ] = None,
    ) -> View:
        if not unmasked:
            return View(admin)
        if admin.role is not Role.admin:
            raise UnmaskedForbidden(f"The {admin.role.value} role sees plates and phones masked")
        if reason is None or not reason.strip():
            raise ReasonRequired("Say why with `reason` (3–500 characters)")
        query = {k: v for k, v in request.query_params.items() if k not in ("unmasked", "reason")}
        settings: Settings = request.app.state.settings
        with _writing(request) as db:
            record(
                db,
                admin,
                service=service,
                action="lookup.unmasked",
                entity=entity,
                entity_id=mask_text(request.url.path)[:200],
                after=lookup_record(settings, request.url.path, query),
                reason=mask_text(reason.strip()),
            )
        return View(admin, unmasked=True)

    return answers(UnmaskedForbidden, ReasonRequired)(dependency)
