from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from shared.wire import Phone


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OtpRequest(Strict):
    phone: Phone


class TokenRequest(Strict):
    phone: Phone
    code: str = Field(min_length=4, max_length=8, examples=["123456"])


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int


class SmsOut(BaseModel):
    phone: str
    body: str
    sent_at: datetime
