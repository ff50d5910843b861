"""An invoice as a PDF (reportlab). Chinese text is set in the CID font STSong-Light, which
every PDF reader carries, so the file embeds no font; digits and codes are set in Helvetica so
that they can be searched and read back from the file."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime
from zoneinfo import ZoneInfo

from reportlab.lib.pagesizes import A4  # type: ignore[import-untyped]
from reportlab.lib.units import mm  # type: ignore[import-untyped]
from reportlab.pdfbase import pdfmetrics  # type: ignore[import-untyped]
from reportlab.pdfbase.cidfonts import UnicodeCIDFont  # type: ignore[import-untyped]
from reportlab.pdfgen.canvas import Canvas  # type: ignore[import-untyped]

from services.billing.invoice.models import Invoice, InvoiceItem, InvoiceKind
from shared.money import format_yuan
from shared.plates import mask_plate_for_message

CJK = "STSong-Light"
LATIN = "Helvetica"
LOCAL = ZoneInfo("Asia/Shanghai")
ROWS_PER_PAGE = 28

pdfmetrics.registerFont(UnicodeCIDFont(CJK))


def _local(at: datetime) -> str:
    return at.astimezone(LOCAL).strftime("%Y-%m-%d %H:%M")


def _yuan(fen: int) -> str:
    return format_yuan(fen).replace("¥", "")


class _Page:
    def __init__(self, canvas: Canvas) -> None:
        self.c = canvas

    def text(self, x: float, y: float, s: str, *, font: str = CJK, size: float = 10) -> None:
        self.c.setFont(font, size)
        self.c.drawString(x, y, s)

    def right(self, x: float, y: float, s: str, *, font: str = LATIN, size: float = 10) -> None:
        self.c.setFont(font, size)
        self.c.drawRightString(x, y, s)


def render(
    invoice: Invoice, items: Sequence[InvoiceItem], original_number: str | None = None
) -> bytes:
    """The invoice's PDF: header, buyer, the charges with lot, times and masked plate, total."""
    buf = io.BytesIO()
    c = Canvas(buf, pagesize=A4, pageCompression=0)
    c.setTitle(f"Invoice {invoice.number}")
    c.setAuthor(invoice.issuer)
    page = _Page(c)
    width, height = A4
    left, right = 20 * mm, width - 20 * mm
    credit = invoice.kind == InvoiceKind.credit

    def header() -> float:
        y = height - 25 * mm
        if credit:
            c.setFillColorRGB(0.75, 0, 0)
        title = "电子发票（红字·停车服务）" if credit else "电子发票（普通发票·停车服务）"
        page.text(left, y, title, size=16)
        c.setFillColorRGB(0, 0, 0)
        y -= 10 * mm
        page.text(left, y, "发票号码")
        page.text(left + 20 * mm, y, invoice.number, font=LATIN)
        page.text(right - 60 * mm, y, "开票日期")
        page.text(right - 40 * mm, y, _local(invoice.issued_at), font=LATIN)
        y -= 7 * mm
        page.text(left, y, f"购买方名称：{invoice.title}")
        y -= 6 * mm
        page.text(left, y, "纳税人识别号：")
        page.text(left + 28 * mm, y, invoice.tax_id or "-", font=LATIN)
        y -= 6 * mm
        page.text(left, y, f"销售方（开票方）：{invoice.issuer}")
        if credit and original_number:
            y -= 6 * mm
            page.text(left, y, "对应蓝字发票号码：")
            page.text(left + 36 * mm, y, original_number, font=LATIN)
        y -= 10 * mm
        for x, label in (
            (left, "停车场"),
            (left + 30 * mm, "车牌"),
            (left + 58 * mm, "入场时间"),
            (left + 96 * mm, "出场时间"),
        ):
            page.text(x, y, label)
        page.right(right, y, "金额（元）", font=CJK)
        c.line(left, y - 2 * mm, right, y - 2 * mm)
        return y - 8 * mm

    y = header()
    for n, item in enumerate(items):
        if n and n % ROWS_PER_PAGE == 0:
            c.showPage()
            y = header()
        page.text(left, y, item.lot_code[:16], font=LATIN, size=9)
        page.text(left + 30 * mm, y, mask_plate_for_message(item.plate), size=9)
        page.text(left + 58 * mm, y, _local(item.entered_at), font=LATIN, size=9)
        page.text(left + 96 * mm, y, _local(item.exited_at), font=LATIN, size=9)
        page.right(right, y, _yuan(item.amount_fen), size=9)
        y -= 6 * mm
    c.line(left, y + 2 * mm, right, y + 2 * mm)
    y -= 4 * mm
    page.text(left, y, "价税合计（小写）", size=11)
    page.right(right, y, f"CNY {_yuan(invoice.amount_fen)}", size=11)
    y -= 7 * mm
    page.text(left, y, f"共 {len(items)} 笔停车费" if items else "退款冲红", size=9)
    c.showPage()
    c.save()
    return buf.getvalue()
