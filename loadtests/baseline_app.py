"""The baseline: a bare FastAPI POST endpoint with a pydantic body, served like the gateway."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class Exit(BaseModel):
    event_id: str
    plate: str
    plate_color: str
    occurred_at: str
    lane: str = ""


@app.post("/v1/connector/exits")
def exit_(body: Exit) -> dict[str, str]:
    return {"event_id": body.event_id, "decision": "postpay", "reason": "enrolled"}
