"""Operations routes without authentication: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get

from gateway.services import Services


class RuntimeStatus(msgspec.Struct):
    url: str
    ready: bool
    detail: str


class Readiness(msgspec.Struct):
    status: str  # "ready" | "not_ready"
    catalog: str  # "ok" or why it cannot be reached
    runtimes: list[RuntimeStatus]
    missing: list[str]  # the parts that keep the gateway from being ready


@get("/healthz", tags=["ops"], sync_to_thread=False)
def healthz() -> dict[str, str]:
    """200 while the process lives."""
    return {"status": "ok"}


@get("/readyz", tags=["ops"])
async def readyz(request: Request[Any, Any, Any]) -> Response[Readiness]:
    """200 once the catalog answers and at least one runtime has its base model loaded."""
    services: Services = request.app.state.services
    catalog = await services.catalog_status()
    runtimes = [
        RuntimeStatus(h.url, h.ready, h.detail) for h in await services.runtime_probe()
    ]
    missing: list[str] = []
    if catalog != "ok":
        missing.append(f"catalog {catalog}")
    if not any(r.ready for r in runtimes):
        missing.append(
            "no runtime configured" if not runtimes else "no runtime has its base model loaded"
        )
    body = Readiness("not_ready" if missing else "ready", catalog, runtimes, missing)
    return Response(body, status_code=503 if missing else 200)


@get("/metrics", media_type="text/plain; version=0.0.4; charset=utf-8", include_in_schema=False)
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    """Prometheus text of gateway/inference/metrics.py's registry."""
    services: Services = request.app.state.services
    return bytes(services.metrics.render())


routes = [healthz, readyz, metrics]
