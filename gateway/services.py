"""The gateway's long-lived parts, built once per app from Settings and shared by routes.

Routes reach them as `request.app.state.services`. The catalog, auth, Redis and the
readiness probe are built here; the inference parts (runtime router, rate limiter, metrics,
model resolver, experiment figures) are slots that `gateway/app.py` fills in its inference
wiring section. A part that owns background work registers coroutines in `on_startup` /
`on_shutdown`; the app's lifespan runs them in order (shutdown in reverse).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from sqlalchemy import text

from gateway.auth import Authenticator, load_admin_token_sha256
from gateway.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncEngine

    from adapters.catalog import Catalog

logger = logging.getLogger("loragate.gateway")

Hook = Callable[[], Awaitable[None]]
CatalogListener = Callable[[str], Awaitable[None]]
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class RuntimeHealth:
    url: str
    ready: bool  # base model loaded and admitting requests
    detail: str  # "ok", "draining", "HTTP 503", "unreachable: ConnectError"


class RuntimeProbe(Protocol):
    async def __call__(self) -> Sequence[RuntimeHealth]: ...


class ExperimentFigures(Protocol):
    """Per-variant figures of an experiment: variant name -> {"requests", "errors",
    "p50_latency_ms", "p95_latency_ms", "tokens"}; variants never seen may be absent.
    Async: with Redis the figures of every gateway are read from there."""

    async def figures(self, tenant: str, experiment: str) -> dict[str, dict[str, Any]]: ...


class Services:
    """A plain class on purpose: Litestar would validate a dataclass field by field on every
    injection, and these parts are ours, not request input."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        auth: Authenticator,
        db_engine: AsyncEngine,
        redis: Redis | None,
        http: httpx.AsyncClient,
        runtime_probe: RuntimeProbe,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.auth = auth
        self.db_engine = db_engine
        self.redis = redis
        self.http = http  # outbound calls: runtime probes (and runtime traffic, if wanted)
        self.runtime_probe = runtime_probe
        # --- inference parts, filled by gateway/app.py's inference wiring ---------------
        self.router: Any = None
        self.rate_limiter: Any = None
        self.metrics: Any = None
        self.resolver: Any = None
        self.experiment_stats: Any = None  # at least ExperimentFigures (GET experiment)
        self.background: Any = None  # book-keeping and shadow tasks after an answer
        # -------------------------------------------------------------------------------
        self.on_startup: list[Hook] = []
        self.on_shutdown: list[Hook] = []
        # Called with the tenant's name after every admin change to its catalog entries,
        # so caches of resolutions can drop that tenant's entries at once.
        self.on_catalog_change: list[CatalogListener] = []

    async def catalog_changed(self, tenant: str) -> None:
        for listener in self.on_catalog_change:
            await listener(tenant)

    async def experiment_figures(self, tenant: str, experiment: str) -> dict[str, dict[str, Any]]:
        if self.experiment_stats is None:
            return {}
        return dict(await self.experiment_stats.figures(tenant, experiment))

    async def catalog_status(self) -> str:
        """'ok', or why the catalog's database cannot be reached."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                async with self.db_engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except Exception as exc:  # any driver or timeout error means "not reachable"
            return f"unreachable: {type(exc).__name__}"
        return "ok"

    @asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        try:
            for hook in self.on_startup:
                await hook()
            yield
        finally:
            for hook in reversed(self.on_shutdown):
                try:
                    await hook()
                except Exception:  # one part failing to stop must not keep the others running
                    logger.exception("shutdown hook failed")
            await self.close()

    async def close(self) -> None:
        await self.http.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        await self.db_engine.dispose()


def http_runtime_probe(http: httpx.AsyncClient, urls: Sequence[str]) -> RuntimeProbe:
    """Readiness of the configured runtimes from their `GET /health` (docs/internals.md)."""

    async def probe_one(url: str) -> RuntimeHealth:
        try:
            response = await http.get(f"{url}/health", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return RuntimeHealth(url, False, f"unreachable: {type(exc).__name__}")
        if response.status_code != 200:
            return RuntimeHealth(url, False, f"HTTP {response.status_code}")
        try:
            status = response.json().get("status")
        except ValueError:
            return RuntimeHealth(url, False, "health answer is not JSON")
        return RuntimeHealth(url, status == "ok", str(status))

    async def probe() -> Sequence[RuntimeHealth]:
        return await asyncio.gather(*(probe_one(u) for u in urls))

    return probe


def build_services(settings: Settings) -> Services:
    """Everything the gateway needs, from settings. Opens no connection until first use."""
    import redis.asyncio as aioredis

    from adapters.base_model import BaseModelSpec
    from adapters.catalog import Catalog
    from adapters.db import create_engine, create_sessionmaker
    from adapters.storage import LocalStore, S3Store

    engine = create_engine(settings.database_url)
    if settings.s3_bucket:
        store: Any = S3Store(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
        )
    else:
        store = LocalStore(settings.artifacts_dir)
    base_model = BaseModelSpec.from_config_file(settings.base_model_path / "config.json")
    catalog = Catalog(
        create_sessionmaker(engine),
        store,
        base_model,
        max_rank=settings.max_lora_rank,
        max_adapter_bytes=settings.max_adapter_bytes + settings.max_adapter_config_bytes,
    )
    redis = None
    if settings.redis_url:
        # Short timeouts: auth reads Redis on the request path and must fall back fast.
        redis = aioredis.from_url(
            settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
        )
    auth = Authenticator(
        catalog,
        load_admin_token_sha256(settings),
        redis,
        cache_ttl_s=settings.effective_key_cache_ttl_s,
        revocation_check_s=settings.revocation_check_s,
    )
    http = httpx.AsyncClient(timeout=httpx.Timeout(settings.request_timeout_s, connect=5.0))
    services = Services(
        settings=settings,
        catalog=catalog,
        auth=auth,
        db_engine=engine,
        redis=redis,
        http=http,
        runtime_probe=http_runtime_probe(http, settings.runtimes),
    )
    services.on_startup.append(auth.start)
    services.on_shutdown.append(auth.stop)
    return services
