"""A withholding provider that behaves like a real one, failure modes included.

`behaviour` of an agreement: `ok`; `insufficient_funds` and `frozen` decline every charge;
`slow` answers after a delay; `timeout_then_ok` takes the money but answers the first charge
too late (the caller times out and must query); `flaky` refuses every other call with 503;
`duplicate_notify` is `ok` (notifications come with a later change).
A repeated `out_trade_no` returns the first captured result: money is never taken twice.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from enum import StrEnum

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from services.paysandbox.models import Agreement, SandboxCharge
from shared.deps import DbSession
from shared.errors import NotFound, problem
from shared.http import problem_response
from shared.timeutil import utcnow

router = APIRouter(prefix="/v1", tags=["payment sandbox"])

AgreementUnknown = problem(404, "agreement_unknown", "No such agreement")
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


class ChargeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agreement_no: str
    out_trade_no: str = Field(min_length=1, max_length=100)
    amount_fen: int = Field(gt=0)
    description: str = Field(default="", max_length=200)


class ChargeOut(BaseModel):
    out_trade_no: str
    trade_no: str
    agreement_no: str
    amount_fen: int
    status: str
    failure_code: str | None
    captured_at: str | None


def _agreement_out(a: Agreement) -> AgreementOut:
    return AgreementOut(
        agreement_no=a.agreement_no,
        holder=a.holder,
        masked_account=f"sandbox ****{a.agreement_no[-4:]}",
        balance_fen=a.balance_fen,
        behaviour=a.behaviour,
        status="frozen" if a.behaviour == Behaviour.frozen else a.status,
    )


def _charge_out(c: SandboxCharge) -> ChargeOut:
    return ChargeOut(
        out_trade_no=c.out_trade_no,
        trade_no=c.trade_no,
        agreement_no=c.agreement_no,
        amount_fen=c.amount_fen,
        status=c.status,
        failure_code=c.failure_code,
        captured_at=c.captured_at.isoformat() if c.captured_at else None,
    )


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


@router.get("/agreements/{agreement_no}", response_model=AgreementOut)
def get_agreement(agreement_no: str, db: DbSession) -> AgreementOut:
    a = db.get(Agreement, agreement_no)
    if a is None:
        raise AgreementUnknown()
    return _agreement_out(a)


@router.post(
    "/charges",
    response_model=ChargeOut,
    responses={402: {"description": "declined (the body says why)"}},
)
def create_charge(
    data: ChargeCreate, db: DbSession
) -> ChargeOut | JSONResponse | StreamingResponse:
    """Withhold an amount. Idempotent on `out_trade_no`; a decline answers 402."""
    a = db.get(Agreement, data.agreement_no)
    if a is None:
        raise AgreementUnknown()
    a.calls += 1
    if a.behaviour == Behaviour.flaky and a.calls % 2 == 1:
        # Answered, not raised: the call counter must survive the refusal.
        return problem_response(
            503,
            "upstream_unavailable",
            "Temporarily unavailable",
            "sandbox: flaky agreement refused this call",
        )
    existing = db.get(SandboxCharge, data.out_trade_no)
    if existing is not None and existing.status == "captured":
        return _charge_out(existing)
    decline = None
    if a.behaviour == Behaviour.frozen:
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
    if existing is None:
        db.add(charge)
    if decline:
        charge.status, charge.failure_code = "declined", decline
    else:
        charge.status, charge.failure_code, charge.captured_at = "captured", None, utcnow()
        a.balance_fen -= data.amount_fen
    db.flush()
    out = _charge_out(charge)
    code = 402 if decline else 200
    delay = (
        SLOW_S
        if a.behaviour == Behaviour.slow
        else (TIMEOUT_S if a.behaviour == Behaviour.timeout_then_ok and a.calls == 1 else 0.0)
    )
    if delay:
        # The transaction commits when this function returns; only the answer is late.
        return StreamingResponse(
            _late(out.model_dump_json(), delay), status_code=code, media_type="application/json"
        )
    return JSONResponse(out.model_dump(), status_code=code)


async def _late(body: str, delay_s: float) -> AsyncIterator[bytes]:
    await asyncio.sleep(delay_s)
    yield body.encode()


@router.get(
    "/charges/{out_trade_no}",
    response_model=ChargeOut,
    responses={404: {"description": "never seen"}},
)
def query_charge(out_trade_no: str, db: DbSession) -> ChargeOut:
    c = db.get(SandboxCharge, out_trade_no)
    if c is None:
        raise NotFound(f"No charge {out_trade_no!r}")
    return _charge_out(c)
