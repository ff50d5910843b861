"""One OpenAPI document for the whole city at the gateway, in the real topology too.

The gateway serves its own operations and forwards the rest; its `/docs` therefore merges the
documents of the services it forwards to (fetched when first asked for, cached once complete).
"""

from __future__ import annotations

from typing import Any

import httpx
import structlog
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

log = structlog.get_logger(__name__)


def install_merged_openapi(app: FastAPI, upstreams: list[str]) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        complete = True
        for url in dict.fromkeys(upstreams):  # unique, in order
            try:
                other = httpx.get(url.rstrip("/") + "/openapi.json", timeout=3).json()
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("docs.upstream_unavailable", upstream=url, error=repr(exc))
                complete = False
                continue
            for path, operations in other.get("paths", {}).items():
                schema["paths"].setdefault(path, operations)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(other.get("components", {}).get("schemas", {}))
        if complete:
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
