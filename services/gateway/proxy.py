"""In the real topology the gateway forwards driver and admin requests to the owning service.

Routing is by path prefix, longest first. Internal paths are never reachable from outside: a
path that could mean something else once decoded or normalised (`..`, `%2e%2e`, `%2f`, `%25`,
backslashes) is refused, the path is forwarded exactly as it was matched, and the headers that
grant internal access are dropped from the caller's request.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx
from fastapi import APIRouter, Request, Response

from shared.doors import path_is_clean, strip_internal
from shared.errors import NotFound, UpstreamUnavailable, problem
from shared.forwarding import FORWARDED_FOR, FORWARDED_PROOF, forwarding_proof
from shared.settings import Settings

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "trailer",
    "host",
    "content-length",
}


URL_SAFE = "/%:@!$&'()*+,;=-._~"  # kept as they are; anything else (raw UTF-8) is escaped
PathInvalid = problem(400, "path_invalid", "The request path is not a plain path")


def routes(settings: Settings) -> list[tuple[str, str]]:
    table = [
        ("/v1/me/sessions", settings.sessions_url),
        ("/v1/admin/sessions", settings.sessions_url),
        ("/v1/admin/charges", settings.billing_url),
        ("/v1/me", settings.billing_url),
        ("/v1/auth", settings.billing_url),
        ("/v1/admin/sandbox", settings.billing_url),
        ("/v1/admin/ledger", settings.billing_url),
        ("/v1/admin/arrears", settings.billing_url),
        ("/v1/admin/disputes", settings.billing_url),
        ("/v1/admin/settlements", settings.billing_url),
        ("/v1/admin/reconciliations", settings.billing_url),
        ("/v1/providers", settings.billing_url),
        ("/v1/merchants", settings.billing_url),
        ("/v1/admin/merchants", settings.billing_url),
        ("/v1/admin/operators", settings.lots_url),
        ("/v1/admin/lots", settings.lots_url),
        ("/v1/admin/districts", settings.lots_url),
        ("/v1/admin/audit", settings.lots_url),
        ("/v1/lots", settings.lots_url),
        ("/v1/quotes", settings.lots_url),
    ]
    return sorted(table, key=lambda r: len(r[0]), reverse=True)


def make_router(settings: Settings) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    table = routes(settings)
    proof = forwarding_proof(settings.jwt_secret.get_secret_value())
    client = httpx.AsyncClient(timeout=15.0)

    @router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def forward(rest: str, request: Request) -> Response:
        raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
        if not path_is_clean(raw_path):
            raise PathInvalid("Dot segments, backslashes and encoded separators are not accepted")
        path = request.url.path
        upstream = next(
            (url for prefix, url in table if path == prefix or path.startswith(prefix + "/")), None
        )
        if upstream is None:
            raise NotFound(f"No route for {path}")
        headers = strip_internal(
            {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        )
        # The caller's address, and proof that the gateway (not the caller) set it: services
        # trust `x-forwarded-for` only with it (shared/forwarding.py).
        headers[FORWARDED_FOR] = request.client.host if request.client else ""
        headers[FORWARDED_PROOF] = proof
        try:
            answer = await client.request(
                request.method,
                # As sent (still encoded): nothing decoded here can turn into `?`, `#` or `/`.
                httpx.URL(upstream.rstrip("/") + quote(raw_path, safe=URL_SAFE)),
                params=request.query_params,
                content=await request.body(),
                headers=headers,
            )
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"The service behind {path} is unreachable") from exc
        out_headers = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() not in HOP_BY_HOP | {"content-encoding"}
        }
        return Response(answer.content, status_code=answer.status_code, headers=out_headers)

    return router
