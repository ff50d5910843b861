"""A webhook lands on a server run by someone other than the driver: the plate it carries, in
`plate` and inside the text, is masked as for anyone else (province + letter + *** + last two)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from services.billing.notification import texts
from services.billing.notification.models import Notification, NotificationKind
from services.billing.notification.port import payload
from shared.plates import mask_plate_for_message


def _notification(plate: str | None) -> Notification:
    masked = mask_plate_for_message(plate) if plate else None
    title, body = texts.captured(masked or "", "观前街停车场", 1250)
    return Notification(
        id="n-1",
        driver_id="d-1",
        kind=NotificationKind.charge_captured,
        dedupe_key="k",
        title=title,
        body=body,
        plate=masked,
        amount_fen=1250,
        ref_id="c-1",
        created_at=datetime(2026, 5, 1, tzinfo=UTC),
    )


def test_webhook_payload_masks_the_plate_as_for_third_parties() -> None:
    n = _notification("苏E12345")
    assert n.plate == "苏E·12*45"  # what the driver reads by SMS / in the app stays as it was
    data = payload(n)["data"]
    assert data["plate"] == "苏E***45"
    assert "苏E***45" in data["body"]
    wire = json.dumps(payload(n), ensure_ascii=False)
    assert "12*45" not in wire
    assert "123" not in wire


def test_new_energy_plates_and_no_plate() -> None:
    assert payload(_notification("苏EAD12345"))["data"]["plate"] == "苏E*****45"
    plain = payload(_notification(None))["data"]
    assert plain["plate"] is None
    assert plain["title"] == "扣款成功"
