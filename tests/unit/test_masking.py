"""What staff see of plates, phones and bank accounts (shared/masking.py)."""

from __future__ import annotations

import json

import pytest

from shared.auth import Admin, Role
from shared.masking import (
    View,
    mask_account,
    mask_doc,
    mask_json_text,
    mask_phone,
    mask_plate,
    mask_text,
)


@pytest.mark.parametrize(
    ("phone", "masked"),
    [("13912345678", "139****5678"), ("1391234", "*******"), ("", "")],
)
def test_mask_phone(phone: str, masked: str) -> None:
    assert mask_phone(phone) == masked


@pytest.mark.parametrize(
    ("account", "masked"),
    [("6222020200112233", "****2233"), ("62220202", "****0202"), ("6222", "****"), ("", "****")],
)
def test_mask_account(account: str, masked: str) -> None:
    assert mask_account(account) == masked


def test_plates_and_phones_in_free_text() -> None:
    text = "KeyError: no lot for 苏E12345 (苏E·1235A), driver 13912345678, id a13912345678b"
    assert mask_text(text) == (
        "KeyError: no lot for 苏E***45 (苏E***5A), driver 139****5678, id a13912345678b"
    )
    assert mask_text(mask_text(text)) == mask_text(text)  # masking twice changes nothing


def test_documents_mask_by_key_and_in_text() -> None:
    doc = {
        "data": {"plate": "粤BD12345", "vehicles": [{"plate": "苏E12345"}], "phone": "13800001111"},
        "note": "seen 苏E54321",
        "settlement_account": "6222020200112233",
        "amount_fen": 500,
    }
    masked = mask_doc(doc)
    assert masked == {
        "data": {"plate": "粤B****45", "vehicles": [{"plate": "苏E***45"}], "phone": "138****1111"},
        "note": "seen 苏E***21",
        "settlement_account": "****2233",
        "amount_fen": 500,
    }
    assert mask_doc(doc, accounts=False)["settlement_account"] == "6222020200112233"
    assert doc["data"]["plate"] == "粤BD12345"  # a copy: the original is untouched


def test_json_text_keeps_unchanged_documents_as_they_were() -> None:
    raw = '{"id":  "x", "n": 1}'
    assert mask_json_text(raw) == raw
    assert json.loads(mask_json_text('{"plate": "苏E12345"}')) == {"plate": "苏E***45"}
    assert mask_json_text("\\x00 garbage 苏E12345") == "\\x00 garbage 苏E***45"


@pytest.mark.parametrize(
    ("role", "unmasked", "plate", "account"),
    [
        (Role.viewer, False, "苏E***45", "****2233"),
        (Role.finance, False, "苏E***45", "6222020200112233"),
        (Role.admin, False, "苏E***45", "6222020200112233"),
        (Role.admin, True, "苏E12345", "6222020200112233"),
    ],
)
def test_the_view_of_each_role(role: Role, unmasked: bool, plate: str, account: str) -> None:
    view = View(Admin(id="t", role=role), unmasked=unmasked)
    assert view.plate("苏E12345") == plate
    assert view.account("6222020200112233") == account
    assert view.doc({"plate": "苏E12345", "settlement_account": "6222020200112233"}) == {
        "plate": plate,
        "settlement_account": account,
    }
    assert mask_plate("苏E12345") == "苏E***45"
