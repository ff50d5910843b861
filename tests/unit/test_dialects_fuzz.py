"""Generated malformed records: a parser never fails on them in any other way than a per-record
rejection (or a body problem for a body that is not a document at all), and a good record
next to any number of bad ones always comes out, intact."""

from __future__ import annotations

import csv
import io
import json
import uuid
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import dialects
from shared.dialects import BODY_PROBLEMS, BatchTooLarge, Dialect
from shared.errors import Problem

GOOD_PLATES = ["苏E12345", "苏EA1234", "沪B9876挂", "苏ED12345"]
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
text_junk = st.text(max_size=40)  # what a text format can carry


def good(dialect: Dialect, n: int) -> dict[str, Any]:
    serial = str(uuid.uuid4()) if dialect is Dialect.canonical else f"GOOD-{n}"
    return {
        "serial": serial,
        "lot": f"LOT-{n % 3}",
        "plate": GOOD_PLATES[n % len(GOOD_PLATES)],
        "kind": "entry" if n % 2 else "exit",
    }


def legacy(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "tccbh": rec["lot"],
        "cph": rec["plate"],
        "cpys": 0,
        "crlx": 1 if rec["kind"] == "entry" else 2,
        "sj": "20241124081000",
        "lsh": rec["serial"],
    }


def canonical(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": rec["kind"],
        "event_id": rec["serial"],
        "lot": rec["lot"],
        "plate": rec["plate"],
        "plate_color": "blue",
        "occurred_at": "2024-11-24T08:10:00+08:00",
    }


def row(rec: dict[str, Any]) -> list[str]:
    return [
        rec["lot"],
        rec["plate"],
        "blue",
        rec["kind"],
        "2024-11-24T08:10:00+08:00",
        rec["serial"],
    ]


def xml_event(fields: dict[str, str], kind: str) -> str:
    inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in fields.items())
    return f"<event type={quoteattr(kind)}>{inner}</event>"


def check(dialect: Dialect, body: bytes, goods: dict[int, dict[str, Any]], total: int) -> None:
    parsed = dialects.parse(dialect, body, max_records=10_000)
    assert parsed.total == total
    taken = {r.index: r for r in parsed.records}
    for index, rec in goods.items():
        assert index in taken, f"good record {index} dropped: {parsed.rejected}"
        assert taken[index].serial == rec["serial"]
        assert taken[index].plate == rec["plate"]
        assert taken[index].lot_code == rec["lot"]
        assert taken[index].kind.value == rec["kind"]
    assert all(r.reason for r in parsed.rejected)


slots = st.lists(st.booleans(), min_size=1, max_size=12)  # True: a good record, False: junk


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(layout=slots, data=st.data())
def test_json_dialects_keep_good_neighbours(layout: list[bool], data: st.DataObject) -> None:
    for dialect, shape in ((Dialect.legacy_json, legacy), (Dialect.canonical, canonical)):
        items: list[Any] = []
        goods: dict[int, dict[str, Any]] = {}
        for i, is_good in enumerate(layout):
            if is_good:
                goods[i] = good(dialect, i)
                items.append(shape(goods[i]))
            else:
                # A good record with some fields replaced by junk, or junk as a whole.
                broken = shape(good(dialect, i))
                for key in data.draw(st.lists(st.sampled_from(sorted(broken)), max_size=3)):
                    broken[key] = data.draw(junk)
                items.append(data.draw(st.one_of(st.just(broken), junk)))
        doc: Any = items if dialect is Dialect.legacy_json else {"events": items}
        # A junk-altered record may still be valid: only the good ones are asserted on.
        check(dialect, json.dumps(doc, allow_nan=True).encode(), goods, len(items))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(layout=slots, data=st.data(), crlf=st.booleans(), bom=st.booleans())
def test_csv_keeps_good_neighbours(
    layout: list[bool], data: st.DataObject, crlf: bool, bom: bool
) -> None:
    newline = "\r\n" if crlf else "\n"
    lines = ["lot,plate,color,kind,time,id"]
    goods: dict[int, dict[str, Any]] = {}
    for i, is_good in enumerate(layout):
        if is_good:
            goods[i] = good(Dialect.csv, i)
            out = io.StringIO()
            csv.writer(out, lineterminator="").writerow(row(goods[i]))
            lines.append(out.getvalue())
        else:
            bad = data.draw(
                text_junk.filter(
                    lambda s: (
                        s.strip()
                        and not any(c in s for c in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
                    )
                )
            )
            lines.append(bad)
    body = (("\ufeff" if bom else "") + newline.join(lines) + newline).encode()
    parsed = dialects.parse(Dialect.csv, body, max_records=10_000)
    assert parsed.total == len(layout)
    kept = {r.index: r for r in parsed.records}
    for index, rec in goods.items():
        assert kept[index].serial == rec["serial"]
        assert kept[index].plate == rec["plate"]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(layout=slots, data=st.data())
def test_xml_keeps_good_neighbours(layout: list[bool], data: st.DataObject) -> None:
    events: list[str] = []
    goods: dict[int, dict[str, Any]] = {}
    for i, is_good in enumerate(layout):
        rec = good(Dialect.xml, i)
        fields = {
            "lot": rec["lot"],
            "plate": rec["plate"],
            "color": "blue",
            "time": "2024-11-24T08:10:00+08:00",
            "id": rec["serial"],
        }
        kind = rec["kind"]
        if is_good:
            goods[i] = rec
        else:
            xml_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)
            for key in data.draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3)):
                fields[key] = data.draw(xml_text)
            kind = data.draw(st.sampled_from([kind, "", "park", "ENTRY "]))
        events.append(xml_event(fields, kind))
    body = ("<events>" + "".join(events) + "</events>").encode()
    parsed = dialects.parse(Dialect.xml, body, max_records=10_000)
    assert parsed.total == len(layout)
    kept = {r.index: r for r in parsed.records}
    for index, rec in goods.items():
        assert kept[index].serial == rec["serial"]


@settings(max_examples=300)
@given(dialect=st.sampled_from(list(Dialect)), body=st.binary(max_size=400))
def test_any_bytes_are_either_records_or_a_body_problem(dialect: Dialect, body: bytes) -> None:
    try:
        parsed = dialects.parse(dialect, body)
    except BODY_PROBLEMS as exc:
        problem: Problem = exc
        assert 400 <= problem.status < 500
    else:
        assert parsed.total == len(parsed.records) + len(parsed.rejected)


def test_batch_size_is_bounded() -> None:
    body = json.dumps([legacy(good(Dialect.legacy_json, i)) for i in range(11)]).encode()
    with pytest.raises(BatchTooLarge) as caught:
        dialects.parse(Dialect.legacy_json, body, max_records=10)
    assert (caught.value.status, caught.value.code) == (413, "batch_too_large")
    assert dialects.parse(Dialect.legacy_json, body, max_records=11).total == 11
