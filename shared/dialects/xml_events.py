"""`xml`: `<events><event type="entry|exit"><lot/><plate/><color/><time/><id/></event></events>`
(SPEC §5), parsed with defusedxml: a DTD, an entity or an external reference refuses the
whole body, so a billion-laughs body costs nothing to turn away."""

from __future__ import annotations

from typing import Any
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from shared.dialects.common import (
    UTF8_BOM,
    BodyEmpty,
    BodyMalformed,
    Dialect,
    Parsed,
    Reason,
    Record,
    RecordError,
    XmlForbidden,
    collect,
    color_field,
    kind_field,
    loose_serial,
    plate_field,
    rfc3339_field,
    serial_field,
    text_field,
)


def _child(event: Element, name: str) -> str | None:
    found = event.findall(name)
    if len(found) > 1:
        raise RecordError(Reason.field_invalid, f"<{name}> appears {len(found)} times")
    return found[0].text if found else None


def _record(index: int, event: Element) -> Record:
    if event.tag != "event":
        raise RecordError(Reason.malformed_record, f"<{event.tag}> is not an <event>")
    return Record(
        index=index,
        serial=serial_field(_child(event, "id"), "id"),
        kind=kind_field(event.get("type")),
        lot_code=text_field(_child(event, "lot"), "lot"),
        plate=plate_field(_child(event, "plate")),
        plate_color=color_field(_child(event, "color")),
        occurred_at=rfc3339_field(_child(event, "time"), "time"),
    )


def _serial(event: Element) -> str | None:
    try:
        return loose_serial(_child(event, "id"))
    except RecordError:
        return None


def parse(body: bytes, max_records: int) -> Parsed:
    if not body.removeprefix(UTF8_BOM).strip():
        raise BodyEmpty("Send at least one <event>")
    try:
        root: Any = fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise XmlForbidden(f"refused: {type(exc).__name__}") from exc
    except (ParseError, ValueError) as exc:
        raise BodyMalformed(f"not well-formed XML: {exc}") from exc
    if root.tag != "events":
        raise BodyMalformed(f"the root element must be <events>, not <{root.tag}>")
    return collect(Dialect.xml, list(root), max_records, _record, _serial)
