"""HTTP of merchant validation: ops register merchants; a merchant, with its API key, validates
its customers' parkings, lists and undoes its own validations and reads its statements."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status

from services.billing.merchant import service as merchants
from services.billing.merchant.models import Merchant, Validation, ValidationStatus
from services.billing.merchant.schemas import (
    MerchantCreate,
    MerchantCreated,
    MerchantOut,
    Statement,
    ValidationCreate,
    ValidationOut,
)
from shared import audit
from shared.auth import Admin, AdminAuth, FinanceAuth, ViewerAuth
from shared.deps import DbSession
from shared.errors import NotFound, PlateColorInvalid, PlateInvalid
from shared.http import problem_responses
from shared.internal import InternalClient
from shared.plates import mask_plate

admin = APIRouter(prefix="/v1/admin/merchants", tags=["admin: merchants"])
merchant = APIRouter(prefix="/v1/merchants", tags=["merchants"])


def _internal(request: Request, service: str) -> InternalClient:
    return request.app.state.runtime.internal(service)  # type: ignore[no-any-return]


def authenticate_merchant(request: Request, db: DbSession) -> Merchant:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise merchants.ApiKeyInvalid("Send the merchant API key as `Authorization: Bearer <key>`")
    return merchants.authenticate(db, key.strip())


MerchantAuth = Annotated[Merchant, Depends(authenticate_merchant)]


def _validation_out(v: Validation) -> ValidationOut:
    out = ValidationOut.model_validate(v, from_attributes=True)
    out.plate = mask_plate(out.plate)
    return out


def _audit(
    db: DbSession, who: Admin, action: str, found: Merchant, before: dict[str, Any] | None = None
) -> None:
    """Never the key itself: its prefix tells keys apart."""
    audit.record(
        db,
        who,
        service="billing",
        action=action,
        entity="merchant",
        entity_id=found.id,
        before=before,
        after={
            "lot_id": found.lot_id,
            "name": found.name,
            "key_prefix": found.key_prefix,
            "per_session_limit": found.per_session_limit,
            "daily_limit": found.daily_limit,
        },
    )


def _statement_response(request: Request, result: Statement) -> Response:
    if "application/json" in request.headers.get("accept", ""):
        return Response(result.model_dump_json(), media_type="application/json")
    return Response(
        merchants.to_csv(result),
        media_type="text/csv; charset=utf-8",
        headers={
            "content-disposition": (
                f'attachment; filename="merchant-{result.merchant_id}-{result.month}.csv"'
            )
        },
    )


STATEMENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": Statement,
        "description": "CSV (default) or, with `Accept: application/json`, the statement",
        "content": {"text/csv": {}},
    },
}


@admin.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=MerchantCreated,
    responses=problem_responses(merchants.LotUnknown),
)
def create_merchant(
    data: MerchantCreate, who: AdminAuth, db: DbSession, request: Request
) -> MerchantCreated:
    """Register a merchant at a car park. The answer carries its API key: the only time it is
    shown (it is stored hashed). Limits: validations per parking and per Asia/Shanghai day.
    Audited."""
    created, api_key = merchants.create_merchant(db, _internal(request, "lots"), data)
    _audit(db, who, "merchant.create", created)
    return _created(created, api_key)


@admin.get("", response_model=list[MerchantOut])
def list_merchants(
    _: ViewerAuth,
    db: DbSession,
    lot_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[MerchantOut]:
    """Merchants, newest first, optionally of one car park (keys are never shown again)."""
    return [
        MerchantOut.model_validate(m, from_attributes=True)
        for m in merchants.merchants_at(db, lot_id, limit)
    ]


@admin.get(
    "/{merchant_id}/statements",
    response_model=None,
    responses={**STATEMENT_RESPONSES, **problem_responses(NotFound, merchants.MonthInvalid)},
)
def merchant_statement(
    merchant_id: str, month: str, request: Request, _: FinanceAuth, db: DbSession
) -> Response:
    """A merchant's monthly statement: every validation applied in the Asia/Shanghai month
    and what it took off the fee, which the merchant owes; the last row is the total."""
    found = merchants.get_merchant(db, merchant_id)
    return _statement_response(request, merchants.statement(db, found, month))


@admin.post(
    "/{merchant_id}/key",
    response_model=MerchantCreated,
    responses=problem_responses(NotFound),
)
def rotate_merchant_key(merchant_id: str, who: AdminAuth, db: DbSession) -> MerchantCreated:
    """Issue the merchant a new API key (e.g. when the old one leaked); the old key stops
    working at once. The answer is the only time the new key is shown. Audited."""
    found = merchants.get_merchant(db, merchant_id)
    before = {"key_prefix": found.key_prefix}
    api_key = merchants.rotate_key(db, found)
    _audit(db, who, "merchant.key_rotate", found, before)
    return _created(found, api_key)


@merchant.post(
    "/me/key",
    response_model=MerchantCreated,
    responses=problem_responses(merchants.ApiKeyInvalid),
)
def rotate_own_key(me: MerchantAuth, db: DbSession) -> MerchantCreated:
    """Replace this merchant's API key by a new one; the key used for this call stops working
    at once. The answer is the only time the new key is shown."""
    return _created(me, merchants.rotate_key(db, me))


def _created(merchant: Merchant, api_key: str) -> MerchantCreated:
    return MerchantCreated(
        **MerchantOut.model_validate(merchant, from_attributes=True).model_dump(), api_key=api_key
    )


@merchant.get("/me", response_model=MerchantOut)
def whoami(me: MerchantAuth) -> MerchantOut:
    """The merchant the API key belongs to, its car park and its limits."""
    return MerchantOut.model_validate(me, from_attributes=True)


@merchant.post(
    "/validations",
    status_code=status.HTTP_201_CREATED,
    response_model=ValidationOut,
    responses=problem_responses(
        merchants.ApiKeyInvalid,
        merchants.NoOpenSession,
        merchants.SessionLimitReached,
        merchants.DailyLimitReached,
        PlateInvalid,
        PlateColorInvalid,
    ),
)
def create_validation(
    data: ValidationCreate, me: MerchantAuth, db: DbSession, request: Request
) -> ValidationOut:
    """Validate a customer's parking at this merchant's car park: `minutes` off the stay, an
    `amount` (fen) off the fee, or `full`. Applied when the car leaves and billed: minutes
    first, then amounts, never below 0. 409 `no_open_session` if the car is not inside."""
    return _validation_out(merchants.validate(db, _internal(request, "sessions"), me, data))


@merchant.get(
    "/validations",
    response_model=list[ValidationOut],
    responses=problem_responses(merchants.ApiKeyInvalid),
)
def list_validations(
    me: MerchantAuth,
    db: DbSession,
    status: ValidationStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[ValidationOut]:
    """This merchant's own validations, newest first (never another merchant's)."""
    return [_validation_out(v) for v in merchants.validations_of(db, me.id, status, limit)]


@merchant.get(
    "/validations/{validation_id}",
    response_model=ValidationOut,
    responses=problem_responses(merchants.ApiKeyInvalid, NotFound),
)
def get_validation(validation_id: str, me: MerchantAuth, db: DbSession) -> ValidationOut:
    """One of this merchant's validations; another merchant's answers 404."""
    return _validation_out(merchants.get_validation(db, me.id, validation_id))


@merchant.delete(
    "/validations/{validation_id}",
    response_model=ValidationOut,
    responses=problem_responses(merchants.ApiKeyInvalid, NotFound, merchants.ValidationNotPending),
)
def cancel_validation(validation_id: str, me: MerchantAuth, db: DbSession) -> ValidationOut:
    """Undo one of this merchant's validations while the car is still inside; once the
    parking is billed it is final (409 `validation_not_pending`)."""
    return _validation_out(merchants.cancel(db, me.id, validation_id))


@merchant.get(
    "/statements",
    response_model=None,
    responses={
        **STATEMENT_RESPONSES,
        **problem_responses(merchants.ApiKeyInvalid, merchants.MonthInvalid),
    },
)
def own_statement(month: str, request: Request, me: MerchantAuth, db: DbSession) -> Response:
    """This merchant's statement for an Asia/Shanghai month (`YYYY-MM`), as for ops."""
    return _statement_response(request, merchants.statement(db, me, month))
