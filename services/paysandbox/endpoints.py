"""A withholding provider that behaves like a real one, failure modes included.

`behaviour` of an agreement: `ok`; `insufficient_funds` and `frozen` decline every charge;
`slow` answers after a delay; `timeout_then_ok` takes the money but answers the first charge
too late (the caller times out and must query); `flaky` refuses every other call with 503;
`duplicate_notify` is `ok` but every notification is delivered twice.

Charges are idempotent on `out_trade_no`: the same key and amount answer the first result; the
same key with another amount is refused (409), never a second debit. A declined charge may be
tried again under its key (after a top-up). Refunds are idempotent on `out_refund_no` and never
exceed what was captured. Captures and refunds are notified asynchronously, signed (notify.py),
to the `notify_url` the caller gave, until acknowledged. `GET /v1/statements/{date}` is the
daily statement CSV, by the Asia/Shanghai day the money moved.
"""

from __future__ import annotations

import asyncio
import csv
import io
import secrets
from collections.abc import AsyncIterator
from datetime import date, datetime, time
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, BackgroundTasks, Depends, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from services.paysandbox import auth, notify
from services.paysandbox.models import Agreement, SandboxCharge, SandboxRefund
from shared.deps import DbSession
from shared.errors import problem
from shared.http import problem_response, problem_responses
from shared.settings import Settings
from shared.timeutil import utcnow

router = APIRouter(
    prefix="/v1",
    tags=["payment sandbox"],
    dependencies=[Depends(auth.require_caller)],
    responses=problem_responses(auth.SandboxTokenInvalid),
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
AgreementUnknown = problem(404, "agreement_unknown", "No such agreement")
ChargeUnknown = problem(404, "charge_unknown", "No charge with this out_trade_no")
RefundUnknown = problem(404, "refund_unknown", "No refund with this out_refund_no")
TradeNoConflict = problem(
    409, "out_trade_no_conflict", "This out_trade_no was used with another amount or agreement"
)
RefundNoConflict = problem(
    409, "out_refund_no_conflict", "This out_refund_no was used for another charge or amount"
)
ChargeNotCaptured = problem(409, "charge_not_captured", "Only a captured charge can be refunded")
RefundExceedsCaptured = problem(
    422, "refund_exceeds_captured", "Refunds would exceed what was captured"
)
AgreementNotActive = problem(409, "agreement_not_active", "The agreement is already cancelled")
SLOW_S = 1.5
TIMEOUT_S = 6.0  # longer than any sane client timeout


class Behaviour(StrEnum):
    ok = "ok"
    insufficient_funds = "insufficient_funds"
    frozen = "frozen"
    timeout_then_ok = "timeout_then_ok"
    flaky = "flaky"
    duplicate_notify = "duplicate_notify"
    slow = "slow"


class AgreementCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    holder: str = Field(min_length=1, max_length=200, examples=["张三"])
    balance_fen: int = Field(ge=0, examples=[100_000])
    behaviour: Behaviour = Behaviour.ok


class AgreementOut(BaseModel):
    agreement_no: str
    holder: str
    masked_account: str
    balance_fen: int
    behaviour: str
    status: str


class Deposit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount_fen: int = Field(gt=0)


class ChargeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agreement_no: str
    out_trade_no: str = Field(min_length=1, max_length=100)
    amount_fen: int = Field(gt=0)
    description: str = Field(default="", max_length=200)
    notify_url: str | None = Field(default=None, max_length=500)


class ChargeOut(BaseModel):
    out_trade_no: str
    trade_no: str
    agreement_no: str
    amount_fen: int
    status: str
    failure_code: str | None
    captured_at: str | None
    refunded_fen: int = 0


class RefundCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out_trade_no: str = Field(min_length=1, max_length=100)
    out_refund_no: str = Field(min_length=1, max_length=100)
    amount_fen: int = Field(gt=0)
    notify_url: str | None = Field(default=None, max_length=500)


class RefundOut(BaseModel):
    out_refund_no: str
    out_trade_no: str
    amount_fen: int
    status: str
    refunded_at: str


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _deliver_soon(request: Request, tasks: BackgroundTasks) -> None:
    """Deliver after the answer; when the sandbox runs as its own process a worker retries."""
    tasks.add_task(
        notify.deliver_due, request.app.state.sessionmaker, notify.notify_secret(_settings(request))
    )


def _agreement_out(a: Agreement) -> AgreementOut:
    return AgreementOut(
        agreement_no=a.agreement_no,
        holder=a.holder,
        masked_account=f"sandbox ****{a.agreement_no[-4:]}",
        balance_fen=a.balance_fen,
        behaviour=a.behaviour,
        status="frozen" if a.behaviour == Behaviour.frozen and a.status == "active" else a.status,
    )


def _refunded(db: DbSession, out_trade_no: str) -> int:
    return int(
        db.scalar(
            select(func.coalesce(func.sum(SandboxRefund.amount_fen), 0)).where(
                SandboxRefund.out_trade_no == out_trade_no
            )
        )
        or 0
    )


def _charge_out(db: DbSession, c: SandboxCharge) -> ChargeOut:
    return ChargeOut(
        out_trade_no=c.out_trade_no,
        trade_no=c.trade_no,
        agreement_no=c.agreement_no,
        amount_fen=c.amount_fen,
        status=c.status,
        failure_code=c.failure_code,
        captured_at=c.captured_at.isoformat() if c.captured_at else None,
        refunded_fen=_refunded(db, c.out_trade_no),
    )


def _refund_out(r: SandboxRefund) -> RefundOut:
    return RefundOut(
        out_refund_no=r.out_refund_no,
        out_trade_no=r.out_trade_no,
        amount_fen=r.amount_fen,
        status=r.status,
        refunded_at=r.refunded_at.isoformat(),
    )


def _copies(a: Agreement) -> int:
    return 2 if a.behaviour == Behaviour.duplicate_notify else 1


def _flaky_refusal(a: Agreement) -> JSONResponse | None:
    a.calls += 1
    if a.behaviour == Behaviour.flaky and a.calls % 2 == 1:
        # Answered, not raised: the call counter must survive the refusal.
        return problem_response(
            503,
            "upstream_unavailable",
            "Temporarily unavailable",
            "sandbox: flaky agreement refused this call",
        )
    return None


@router.post("/agreements", status_code=status.HTTP_201_CREATED, response_model=AgreementOut)
def create_agreement(data: AgreementCreate, db: DbSession) -> AgreementOut:
    """Open a withholding agreement (the driver's account at the provider)."""
    a = Agreement(
        agreement_no="AGR-" + secrets.token_hex(6),
        holder=data.holder,
        balance_fen=data.balance_fen,
        behaviour=data.behaviour,
    )
    db.add(a)
    db.flush()
    return _agreement_out(a)


@router.get(
    "/agreements/{agreement_no}",
    response_model=AgreementOut,
    responses=problem_responses(AgreementUnknown),
)
def get_agreement(agreement_no: str, db: DbSession) -> AgreementOut:
    """An agreement's holder, balance, behaviour and status (`active`, `frozen`, `cancelled`)."""
    a = db.get(Agreement, agreement_no)
    if a is None:
        raise AgreementUnknown()
    return _agreement_out(a)


@router.post(
    "/agreements/{agreement_no}/cancel",
    response_model=AgreementOut,
    responses=problem_responses(AgreementUnknown, AgreementNotActive),
)
def cancel_agreement(agreement_no: str, db: DbSession) -> AgreementOut:
    """Cancel the agreement (the account holder withdrew it): every later charge declines."""
    a = db.get(Agreement, agreement_no, with_for_update=True)
    if a is None:
        raise AgreementUnknown()
    if a.status != "active":
        raise AgreementNotActive()
    a.status = "cancelled"
    db.flush()
    return _agreement_out(a)


@router.post(
    "/agreements/{agreement_no}/deposits",
    response_model=AgreementOut,
    responses=problem_responses(AgreementUnknown),
)
def deposit(agreement_no: str, data: Deposit, db: DbSession) -> AgreementOut:
    """Top the account up (and clear a `insufficient_funds` behaviour: the money is there now)."""
    a = db.get(Agreement, agreement_no, with_for_update=True)
    if a is None:
        raise AgreementUnknown()
    a.balance_fen += data.amount_fen
    if a.behaviour == Behaviour.insufficient_funds:
        a.behaviour = Behaviour.ok
    db.flush()
    return _agreement_out(a)


@router.post(
    "/charges",
    response_model=ChargeOut,
    responses={
        402: {"description": "declined (the body says why)"},
        **problem_responses(AgreementUnknown, TradeNoConflict),
    },
)
def create_charge(
    data: ChargeCreate, db: DbSession, request: Request, tasks: BackgroundTasks
) -> ChargeOut | JSONResponse | StreamingResponse:
    """Withhold an amount. Idempotent on `out_trade_no`; a decline answers 402."""
    a = db.get(Agreement, data.agreement_no, with_for_update=True)
    if a is None:
        raise AgreementUnknown()
    refused = _flaky_refusal(a)
    if refused is not None:
        return refused
    query = select(SandboxCharge).where(SandboxCharge.out_trade_no == data.out_trade_no)
    if db.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()  # two concurrent resends must not both debit
    existing = db.scalar(query)
    if existing is not None and (
        existing.amount_fen != data.amount_fen or existing.agreement_no != data.agreement_no
    ):
        raise TradeNoConflict(
            f"{data.out_trade_no} was charged {existing.amount_fen} fen on "
            f"{existing.agreement_no}; refusing {data.amount_fen} fen"
        )
    if existing is not None and existing.status == "captured":
        return _charge_out(db, existing)
    decline = None
    if a.status != "active":
        decline = "agreement_cancelled"
    elif a.behaviour == Behaviour.frozen:
        decline = "account_frozen"
    elif a.behaviour == Behaviour.insufficient_funds or a.balance_fen < data.amount_fen:
        decline = "insufficient_funds"
    charge = existing or SandboxCharge(
        out_trade_no=data.out_trade_no,
        trade_no="T" + secrets.token_hex(8),
        agreement_no=a.agreement_no,
        amount_fen=data.amount_fen,
        status="declined",
        description=data.description,
    )
    charge.notify_url = data.notify_url or charge.notify_url
    if existing is None:
        db.add(charge)
    if decline:
        charge.status, charge.failure_code = "declined", decline
    else:
        charge.status, charge.failure_code, charge.captured_at = "captured", None, utcnow()
        a.balance_fen -= data.amount_fen
        notify.enqueue(
            db,
            url=charge.notify_url,
            copies=_copies(a),
            payload={
                "notify_id": "N" + secrets.token_hex(8),
                "kind": "charge",
                "out_trade_no": charge.out_trade_no,
                "out_refund_no": None,
                "trade_no": charge.trade_no,
                "amount_fen": charge.amount_fen,
                "status": "captured",
                "occurred_at": charge.captured_at.isoformat(),
            },
        )
        _deliver_soon(request, tasks)
    db.flush()
    out = _charge_out(db, charge)
    code = 402 if decline else 200
    delay = (
        SLOW_S
        if a.behaviour == Behaviour.slow
        else (TIMEOUT_S if a.behaviour == Behaviour.timeout_then_ok and a.calls == 1 else 0.0)
    )
    if delay:
        # The transaction commits when this function returns; only the answer is late.
        return StreamingResponse(
            _late(out.model_dump_json(), delay),
            status_code=code,
            media_type="application/json",
            background=tasks,
        )
    return JSONResponse(out.model_dump(), status_code=code, background=tasks)


async def _late(body: str, delay_s: float) -> AsyncIterator[bytes]:
    await asyncio.sleep(delay_s)
    yield body.encode()


@router.get(
    "/charges/{out_trade_no}",
    response_model=ChargeOut,
    responses=problem_responses(ChargeUnknown),
)
def query_charge(out_trade_no: str, db: DbSession) -> ChargeOut:
    """The outcome of an earlier charge request (404: never seen, so sending again is safe)."""
    c = db.get(SandboxCharge, out_trade_no)
    if c is None:
        raise ChargeUnknown(f"No charge {out_trade_no!r}")
    return _charge_out(db, c)


@router.post(
    "/refunds",
    response_model=RefundOut,
    responses=problem_responses(
        ChargeUnknown, RefundNoConflict, ChargeNotCaptured, RefundExceedsCaptured
    ),
)
def create_refund(
    data: RefundCreate, db: DbSession, request: Request, tasks: BackgroundTasks
) -> RefundOut | JSONResponse:
    """Give back part or all of a captured charge. Idempotent on `out_refund_no`."""
    query = select(SandboxCharge).where(SandboxCharge.out_trade_no == data.out_trade_no)
    if db.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()  # refunds of one charge are checked one at a time
    charge = db.scalar(query)
    if charge is None:
        raise ChargeUnknown(f"No charge {data.out_trade_no!r}")
    a = db.get(Agreement, charge.agreement_no, with_for_update=True)
    assert a is not None  # a charge always has its agreement
    refused = _flaky_refusal(a)
    if refused is not None:
        return refused
    existing = db.get(SandboxRefund, data.out_refund_no)
    if existing is not None:
        if existing.out_trade_no != data.out_trade_no or existing.amount_fen != data.amount_fen:
            raise RefundNoConflict(f"{data.out_refund_no} was a refund of {existing.amount_fen}")
        return _refund_out(existing)
    if charge.status != "captured":
        raise ChargeNotCaptured(f"{data.out_trade_no} is {charge.status}")
    already = _refunded(db, charge.out_trade_no)
    if already + data.amount_fen > charge.amount_fen:
        raise RefundExceedsCaptured(
            f"captured {charge.amount_fen}, refunded {already}, asked {data.amount_fen}",
            refundable_fen=charge.amount_fen - already,
        )
    refund = SandboxRefund(
        out_refund_no=data.out_refund_no,
        out_trade_no=charge.out_trade_no,
        amount_fen=data.amount_fen,
        status="succeeded",
        refunded_at=utcnow(),
    )
    db.add(refund)
    a.balance_fen += data.amount_fen
    notify.enqueue(
        db,
        url=data.notify_url,
        copies=_copies(a),
        payload={
            "notify_id": "N" + secrets.token_hex(8),
            "kind": "refund",
            "out_trade_no": charge.out_trade_no,
            "out_refund_no": refund.out_refund_no,
            "trade_no": charge.trade_no,
            "amount_fen": refund.amount_fen,
            "status": "succeeded",
            "occurred_at": refund.refunded_at.isoformat(),
        },
    )
    db.flush()
    _deliver_soon(request, tasks)
    return JSONResponse(_refund_out(refund).model_dump(), background=tasks)


@router.get(
    "/refunds/{out_refund_no}",
    response_model=RefundOut,
    responses=problem_responses(RefundUnknown),
)
def query_refund(out_refund_no: str, db: DbSession) -> RefundOut:
    """The outcome of an earlier refund request (404: never seen)."""
    r = db.get(SandboxRefund, out_refund_no)
    if r is None:
        raise RefundUnknown(f"No refund {out_refund_no!r}")
    return _refund_out(r)


STATEMENT_COLUMNS = ["kind", "out_trade_no", "out_refund_no", "trade_no", "amount_fen", "at"]


def statement_rows(db: DbSession, day: date) -> list[dict[str, Any]]:
    start = datetime.combine(day, time(0), SHANGHAI)
    end = datetime.combine(day, time.max, SHANGHAI)  # inclusive: date.max has no next day
    rows: list[dict[str, Any]] = []
    for c in db.scalars(
        select(SandboxCharge)
        .where(
            SandboxCharge.status == "captured",
            SandboxCharge.captured_at >= start,
            SandboxCharge.captured_at <= end,
        )
        .order_by(SandboxCharge.captured_at)
    ):
        assert c.captured_at is not None
        rows.append(
            {
                "kind": "charge",
                "out_trade_no": c.out_trade_no,
                "out_refund_no": "",
                "trade_no": c.trade_no,
                "amount_fen": c.amount_fen,
                "at": c.captured_at.isoformat(),
            }
        )
    for r, trade_no in db.execute(
        select(SandboxRefund, SandboxCharge.trade_no)
        .join(SandboxCharge, SandboxCharge.out_trade_no == SandboxRefund.out_trade_no)
        .where(SandboxRefund.refunded_at >= start, SandboxRefund.refunded_at <= end)
        .order_by(SandboxRefund.refunded_at)
    ):
        rows.append(
            {
                "kind": "refund",
                "out_trade_no": r.out_trade_no,
                "out_refund_no": r.out_refund_no,
                "trade_no": trade_no,
                "amount_fen": r.amount_fen,
                "at": r.refunded_at.isoformat(),
            }
        )
    return rows


@router.get(
    "/statements/{day}",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "the day's statement"}},
)
def statement(day: date, db: DbSession) -> Response:
    """Every capture and refund of one Asia/Shanghai day, as CSV (amounts in fen)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=STATEMENT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(statement_rows(db, day))
    return Response(buffer.getvalue(), media_type="text/csv; charset=utf-8")
