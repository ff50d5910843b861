"""Domain errors rendered as RFC 9457 problem documents with a stable machine `code`."""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_BASE = "https://citypark.example/problems/"


class Problem(Exception):
    """An error a client can act on. Subclasses fix `status` and `code`; `detail` varies."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    title: ClassVar[str] = "Bad request"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        self.detail = detail or self.title
        self.extra = extra
        super().__init__(self.detail)

    def to_dict(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.code.replace("_", "-"),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


def problem(status: int, code: str, title: str) -> type[Problem]:
    """Declare a Problem subclass in one line: `X = problem(422, "plate_invalid", "...")`."""
    name = "".join(part.title() for part in code.split("_"))
    return type(name, (Problem,), {"status": status, "code": code, "title": title})


# Errors shared by several services. Module-specific ones live next to their service.
ValidationFailed = problem(422, "validation_failed", "The request body or parameters are invalid")
NotFound = problem(404, "not_found", "Not found")
Unauthorized = problem(401, "unauthorized", "Authentication required")
TokenExpired = problem(401, "token_expired", "The token has expired")
TokenRevoked = problem(401, "token_revoked", "The token was revoked")
Forbidden = problem(403, "forbidden", "Not allowed")
CursorInvalid = problem(422, "cursor_invalid", "The page cursor is not valid")
Conflict = problem(409, "conflict", "Conflict")
RateLimited = problem(429, "rate_limited", "Too many requests")
UpstreamUnavailable = problem(503, "upstream_unavailable", "A dependency is unavailable; retry")
# A neighbour refused our request as a client error: a contract breach on our side, not an outage.
UpstreamRejected = problem(502, "upstream_rejected", "A dependency refused the request")

PlateInvalid = problem(422, "plate_invalid", "The licence plate is not a valid plate")
PlateColorInvalid = problem(422, "plate_color_invalid", "Unknown plate colour")
TariffInvalid = problem(422, "tariff_invalid", "The tariff document is invalid")

SignatureMissing = problem(401, "signature_missing", "The request is not signed")
SignatureInvalid = problem(401, "signature_invalid", "The signature does not verify")
KeyUnknown = problem(401, "key_unknown", "The signing key is not registered")
SignatureExpired = problem(401, "signature_expired", "The signature is too old or from the future")
NonceReused = problem(401, "nonce_reused", "The signature nonce was already used")
DigestMismatch = problem(401, "digest_mismatch", "The body does not match its Content-Digest")
