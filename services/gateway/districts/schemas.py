from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class RecordResult(BaseModel):
    index: int  # position of the record in the body (CSV: data line, header not counted)
    serial: str | None  # the district's own id of the record, as far as it could be read
    status: Literal["accepted", "duplicate", "rejected"]
    event_id: str | None = None  # the id the record travels under downstream
    code: str | None = None  # why it was rejected (stable)
    detail: str | None = None


class DistrictBatchOut(BaseModel):
    district: str
    dialect: str
    received: int
    accepted: int
    duplicates: int
    rejected: int
    results: list[RecordResult]
