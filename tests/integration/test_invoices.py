"""E-invoices on PostgreSQL: issued over captured charges through the sandbox provider, a real
PDF that reads back its number and total, each charge invoiced once (also under a race), and a
red-letter invoice when an invoiced charge is refunded."""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from pypdf import PdfReader
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.billing.charge.models import Charge, ChargeStatus
from services.billing.driver.models import Driver
from services.billing.invoice.models import Invoice, InvoiceKind
from services.billing.main import part as billing_part
from services.billing.provider.port import RefundResult
from services.billing.refund import service as refunds
from services.billing.refund.models import Refund
from shared.auth import issue_driver_token
from shared.bus.models import LogRow
from shared.events import EventType
from shared.http import make_app
from shared.runtime import Runtime, attach

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(runtime: Runtime) -> Iterator[TestClient]:
    app = make_app("billing", "")
    attach(app, runtime)
    for router in billing_part.routers:
        app.include_router(router)
    with TestClient(app) as client:
        yield client


def new_driver(factory: sessionmaker[Session]) -> str:
    with factory() as db, db.begin():
        driver = Driver(phone=f"137{uuid.uuid4().int % 10**8:08d}")
        db.add(driver)
        db.flush()
        return driver.id


def captured(
    factory: sessionmaker[Session],
    driver_id: str,
    amount_fen: int,
    *,
    status: ChargeStatus = ChargeStatus.captured,
    lot_code: str = "GUSU-0001",
) -> str:
    exited = datetime.now(UTC) - timedelta(hours=2)
    with factory() as db, db.begin():
        charge = Charge(
            session_id=str(uuid.uuid4()),
            driver_id=driver_id,
            lot_id=str(uuid.uuid4()),
            lot_code=lot_code,
            operator_id="op-invoices",
            plate="苏E12345",
            plate_color="blue",
            entered_at=exited - timedelta(hours=3, minutes=10),
            exited_at=exited,
            amount_fen=amount_fen,
            breakdown={"lines": []},
            status=status,
            provider="sandbox",
            captured_at=exited if status == ChargeStatus.captured else None,
        )
        db.add(charge)
        db.flush()
        return charge.id


def auth(runtime: Runtime, driver_id: str) -> dict[str, str]:
    return {"authorization": f"Bearer {issue_driver_token(runtime.secret, driver_id, 600)}"}


def pdf_text(body: bytes) -> str:
    assert body.startswith(b"%PDF-")
    reader = PdfReader(io.BytesIO(body))
    return "\n".join(page.extract_text() for page in reader.pages)


def test_an_invoice_over_several_charges_totals_them_and_its_pdf_says_so(
    api: TestClient, runtime: Runtime, factory: sessionmaker[Session]
) -> None:
    driver = new_driver(factory)
    ids = [captured(factory, driver, fen) for fen in (1_250, 800, 3_005)]
    answer = api.post(
        "/v1/me/invoices",
        json={"charge_ids": ids, "title": "苏州测试科技有限公司", "tax_id": "91320500MA1ABCDE0X"},
        headers=auth(runtime, driver),
    )
    assert answer.status_code == 201, answer.text
    invoice = answer.json()
    assert invoice["amount_fen"] == 1_250 + 800 + 3_005
    assert invoice["status"] == "issued"
    number = invoice["number"]
    assert len(number) == 20
    assert number.isdigit()

    detail = api.get(f"/v1/me/invoices/{invoice['id']}", headers=auth(runtime, driver)).json()
    assert sorted(i["charge_id"] for i in detail["items"]) == sorted(ids)
    assert sum(i["amount_fen"] for i in detail["items"]) == invoice["amount_fen"]
    assert {i["plate"] for i in detail["items"]} == {"苏E·12*45"}

    pdf = api.get(f"/v1/me/invoices/{invoice['id']}/pdf", headers=auth(runtime, driver))
    assert pdf.status_code == 200
    assert pdf.headers["content-type"] == "application/pdf"
    text = pdf_text(pdf.content)
    assert number in text
    assert "CNY 50.55" in text  # the total, as the sum of its charges
    for fen in ("12.50", "8.00", "30.05"):
        assert fen in text
    assert "GUSU-0001" in text
    assert "91320500MA1ABCDE0X" in text
    # the Chinese parts are set in the CID font STSong-Light, not embedded
    assert b"/STSong-Light" in pdf.content
    assert b"UniGB-UCS2-H" in pdf.content

    listed = api.get("/v1/me/invoices", headers=auth(runtime, driver)).json()
    assert [i["id"] for i in listed] == [invoice["id"]]


def test_numbers_are_sequential_and_unique(
    api: TestClient, runtime: Runtime, factory: sessionmaker[Session]
) -> None:
    driver = new_driver(factory)
    numbers = []
    for _ in range(3):
        charge = captured(factory, driver, 500)
        answer = api.post(
            "/v1/me/invoices",
            json={"charge_ids": [charge], "title": "个人"},
            headers=auth(runtime, driver),
        )
        assert answer.status_code == 201, answer.text
        numbers.append(int(answer.json()["number"]))
    assert numbers == sorted(numbers)
    assert [b - a for a, b in zip(numbers, numbers[1:], strict=False)] == [1, 1]


def test_a_charge_is_invoiced_once(
    api: TestClient, runtime: Runtime, factory: sessionmaker[Session]
) -> None:
    driver = new_driver(factory)
    a, b = captured(factory, driver, 600), captured(factory, driver, 700)
    first = api.post(
        "/v1/me/invoices", json={"charge_ids": [a], "title": "个人"}, headers=auth(runtime, driver)
    )
    assert first.status_code == 201
    again = api.post(
        "/v1/me/invoices",
        json={"charge_ids": [b, a], "title": "个人"},
        headers=auth(runtime, driver),
    )
    assert again.status_code == 409
    assert again.headers["content-type"].startswith("application/problem+json")
    assert again.json()["code"] == "already_invoiced"
    assert again.json()["charge_ids"] == [a]
    # the refused request left b free to invoice
    alone = api.post(
        "/v1/me/invoices", json={"charge_ids": [b], "title": "个人"}, headers=auth(runtime, driver)
    )
    assert (alone.status_code, alone.json()["amount_fen"]) == (201, 700)


def test_two_racing_requests_for_one_charge_issue_one_invoice(
    api: TestClient, runtime: Runtime, factory: sessionmaker[Session]
) -> None:
    driver = new_driver(factory)
    charge = captured(factory, driver, 900)
    answers: list[int] = []
    barrier = threading.Barrier(4)

    def ask() -> None:
        barrier.wait()
        answers.append(
            api.post(
                "/v1/me/invoices",
                json={"charge_ids": [charge], "title": "个人"},
                headers=auth(runtime, driver),
            ).status_code
        )

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [201, 409, 409, 409]
    with factory() as db:
        assert len(list(db.scalars(select(Invoice).where(Invoice.driver_id == driver)))) == 1


def test_unhappy_requests(
    api: TestClient, runtime: Runtime, factory: sessionmaker[Session]
) -> None:
    driver, other = new_driver(factory), new_driver(factory)
    theirs = captured(factory, other, 1_000)
    declined = captured(factory, driver, 1_000, status=ChargeStatus.declined)
    mine = captured(factory, driver, 1_000)
    headers = auth(runtime, driver)

    def post(body: dict[str, object]) -> tuple[int, str | None]:
        answer = api.post("/v1/me/invoices", json=body, headers=headers)
        return answer.status_code, answer.json().get("code")

    assert post({"charge_ids": [theirs], "title": "个人"}) == (404, "not_found")
    assert post({"charge_ids": [mine, theirs], "title": "个人"}) == (404, "not_found")
    assert post({"charge_ids": [str(uuid.uuid4())], "title": "个人"}) == (404, "not_found")
    assert post({"charge_ids": [declined], "title": "个人"}) == (409, "charge_not_invoiceable")
    assert post({"charge_ids": [], "title": "个人"}) == (422, "validation_failed")
    assert post({"charge_ids": [mine], "title": ""}) == (422, "validation_failed")
    assert post({"charge_ids": [mine], "title": "x", "tax_id": "not a tax id"}) == (
        422,
        "validation_failed",
    )
    # nothing above issued anything
    assert api.get("/v1/me/invoices", headers=headers).json() == []
    # another driver's invoice is not found, nor its PDF
    theirs_invoice = api.post(
        "/v1/me/invoices",
        json={"charge_ids": [theirs], "title": "他人"},
        headers=auth(runtime, other),
    ).json()
    assert api.get(f"/v1/me/invoices/{theirs_invoice['id']}", headers=headers).status_code == 404
    pdf = api.get(f"/v1/me/invoices/{theirs_invoice['id']}/pdf", headers=headers)
    assert (pdf.status_code, pdf.json()["code"]) == (404, "not_found")
    assert api.get("/v1/me/invoices").status_code == 401


def refund_succeeds(factory: sessionmaker[Session], charge_id: str, amount_fen: int) -> str:
    """A refund the provider confirmed, through the refund flow's own notice path."""
    with factory() as db, db.begin():
        refund = Refund(charge_id=charge_id, amount_fen=amount_fen)
        db.add(refund)
        db.flush()
        result = RefundResult(refund.id, amount_fen, datetime.now(UTC))
        assert refunds.apply_notice(db, refund, result)
        return refund.id


def test_a_refund_after_invoicing_issues_red_letter_invoices(
    api: TestClient, runtime: Runtime, factory: sessionmaker[Session]
) -> None:
    driver = new_driver(factory)
    a, b = captured(factory, driver, 2_000), captured(factory, driver, 1_000)
    headers = auth(runtime, driver)
    original = api.post(
        "/v1/me/invoices", json={"charge_ids": [a, b], "title": "个人"}, headers=headers
    ).json()
    assert original["amount_fen"] == 3_000

    first_refund = refund_succeeds(factory, a, 500)
    detail = api.get(f"/v1/me/invoices/{original['id']}", headers=headers).json()
    assert detail["status"] == "partially_credited"
    [credit] = detail["credits"]
    assert (credit["kind"], credit["amount_fen"], credit["original_id"]) == (
        "credit",
        -500,
        original["id"],
    )
    assert credit["number"] != original["number"]
    assert credit["number"][4] == "1"  # the kind digit of a red-letter number

    pdf = api.get(f"/v1/me/invoices/{credit['id']}/pdf", headers=headers)
    text = pdf_text(pdf.content)
    assert credit["number"] in text
    assert original["number"] in text  # it names the invoice it offsets
    assert "CNY -5.00" in text

    # the refund's event carries the red-letter number to the notification consumer
    with factory() as db:
        row = db.scalar(
            select(LogRow).where(LogRow.event_id == f"{EventType.refund_succeeded}-{first_refund}")
        )
        assert row is not None
        assert credit["number"] in row.payload

    # a second notice for the same refund changes nothing; the rest refunded credits it fully
    with factory() as db, db.begin():
        refund = db.get(Refund, first_refund)
        assert refund is not None
        assert not refunds.apply_notice(db, refund, RefundResult(refund.id, 500, datetime.now(UTC)))
    refund_succeeds(factory, a, 1_500)
    refund_succeeds(factory, b, 1_000)
    detail = api.get(f"/v1/me/invoices/{original['id']}", headers=headers).json()
    assert detail["status"] == "credited"
    assert sorted(c["amount_fen"] for c in detail["credits"]) == [-1_500, -1_000, -500]
    assert sum(c["amount_fen"] for c in detail["credits"]) == -original["amount_fen"]
    with factory() as db:
        kinds = [i.kind for i in db.scalars(select(Invoice).where(Invoice.driver_id == driver))]
    assert sorted(kinds) == [InvoiceKind.credit] * 3 + [InvoiceKind.normal]


def test_a_refund_of_a_charge_never_invoiced_issues_nothing_and_invoices_the_rest(
    api: TestClient, runtime: Runtime, factory: sessionmaker[Session]
) -> None:
    driver = new_driver(factory)
    charge = captured(factory, driver, 2_000)
    refund_succeeds(factory, charge, 800)
    headers = auth(runtime, driver)
    assert api.get("/v1/me/invoices", headers=headers).json() == []
    invoice = api.post(
        "/v1/me/invoices", json={"charge_ids": [charge], "title": "个人"}, headers=headers
    ).json()
    assert invoice["amount_fen"] == 1_200  # what is left of the charge after its refund
    refund_succeeds(factory, charge, 1_200)
    again = api.post(
        "/v1/me/invoices",
        json={"charge_ids": [captured(factory, driver, 100)], "title": "个人"},
        headers=headers,
    )
    assert again.status_code == 201
