"""An unmasked look-up's audit entry: no plate or phone in what travels on the audit topic, the
query as asked still readable by an admin's unmasked read of the log."""

from __future__ import annotations

import json
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlencode

from pydantic import SecretStr
from starlette.requests import Request

from shared.auth import Admin, Role
from shared.masking import SEALED_QUERY, mask_phone, mask_plate, open_lookup, staff_view
from shared.settings import Settings

KEYS = Settings(jwt_secret=SecretStr("unit-secret-0123456789abcdefghij"))
PLATE, DOTTED, PHONE = "苏E12345", "苏E·12345", "13912345678"


class _Db:
    @contextmanager
    def begin(self) -> Any:
        yield self


@contextmanager
def _factory() -> Any:
    yield _Db()


def _request(path: str, query: str) -> Request:
    app = SimpleNamespace(
        state=SimpleNamespace(settings=KEYS, sessionmaker=_factory, request_sessionmaker=None)
    )
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [],
        "app": app,
    }
    return Request(scope)


def test_the_recorded_look_up_names_no_plate_or_phone_but_an_admin_can_still_read_it() -> None:
    recorded: list[dict[str, Any]] = []
    dependency = staff_view(
        "sessions", "session", record=lambda db, actor, **kw: recorded.append(kw)
    )
    query = urlencode(
        {"plate": PLATE, "phone": PHONE, "note": DOTTED, "unmasked": "true", "reason": "x"}
    )
    view = dependency(
        _request(f"/v1/admin/drivers/{PHONE}", query),
        Admin(id="a1", role=Role.admin),
        unmasked=True,
        reason=f"police request about {DOTTED}",
    )
    assert view.unmasked
    [entry] = recorded
    text = json.dumps(entry, ensure_ascii=False)
    for secret in (PLATE, DOTTED, PHONE, "E12345", "12345678"):
        assert secret not in text
    assert entry["after"]["query"]["plate"] == mask_plate(PLATE)
    assert entry["entity_id"] == f"/v1/admin/drivers/{mask_phone(PHONE)}"
    assert entry["reason"].startswith("police request about 苏E")

    asked = {"plate": PLATE, "phone": PHONE, "note": DOTTED}
    assert open_lookup(KEYS, entry["after"], unmasked=True)["query"] == asked
    masked = open_lookup(KEYS, entry["after"], unmasked=False)
    assert SEALED_QUERY not in masked
    assert masked["query"]["phone"] == mask_phone(PHONE)
    # Sealed under a key this process lacks: the masked copy, never an error.
    other = Settings(jwt_secret=SecretStr("another-secret-0123456789abcdefgh"))
    assert open_lookup(other, entry["after"], unmasked=True)["query"] == masked["query"]


def test_a_query_without_personal_data_is_kept_as_it_was() -> None:
    recorded: list[dict[str, Any]] = []
    dependency = staff_view(
        "sessions", "session", record=lambda db, actor, **kw: recorded.append(kw)
    )
    dependency(
        _request("/v1/admin/sessions", "lot_id=L1&status=open"),
        Admin(id="a1", role=Role.admin),
        unmasked=True,
        reason="a dispute",
    )
    assert recorded[0]["after"] == {
        "path": "/v1/admin/sessions",
        "query": {"lot_id": "L1", "status": "open"},
    }
