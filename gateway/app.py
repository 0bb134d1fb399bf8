"""The composition root: `build_services(settings)` builds every part of the gateway once,
and `create_app(settings)` serves them, starting and stopping them in one order.

Nothing here reads the environment or runs at import: settings come in, services are
built from them (or passed in by tests), and the lifespan starts `Services.parts` in order
and stops them in reverse.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import redis.asyncio as aioredis
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.router import Router as LitestarRouter

from adapters.base_model import BaseModelSpec
from adapters.catalog import Catalog
from adapters.db import create_engine, create_sessionmaker
from adapters.storage import ArtifactStore, LocalStore, S3Store
from gateway import errors
from gateway.api.routes import admin, feedback, openai, ops
from gateway.auth import Authenticator, load_admin_token_sha256, require_any_token
from gateway.inference.experiments import ExperimentStats
from gateway.inference.feedback import AnswerLog, ScoreBook
from gateway.inference.metrics import Metrics
from gateway.inference.pipeline import Background, Pipeline
from gateway.inference.ratelimit import RateLimiter
from gateway.inference.resolver import Resolver
from gateway.inference.rollouts import RolloutController, RolloutStats
from gateway.inference.router import Router
from gateway.inference.shadow import Shadow
from gateway.services import Part, Services
from gateway.settings import Settings

API_VERSION = "1"


def build_services(settings: Settings, extra_parts: Sequence[Part] = ()) -> Services:
    """Every part, from settings, with its place in the start/stop order; `extra_parts`
    (serve's runtime-child watcher) start last and stop first. Opens no connection before
    the parts start or are first used."""
    engine = create_engine(settings.database_url)
    store: ArtifactStore
    if settings.s3_bucket:
        store = S3Store(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
        )
    else:
        store = LocalStore(settings.artifacts_dir)
    catalog = Catalog(
        create_sessionmaker(engine),
        store,
        BaseModelSpec.from_config_file(settings.base_model_path / "config.json"),
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
    # The router's /health and /stats probes; /generate traffic has a client of its own
    # (gateway/inference/runtime_client.py).
    runtime_http = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        timeout=httpx.Timeout(settings.request_timeout_s, connect=5.0),
    )
    router = Router(runtime_http, settings.runtimes, redis,
                    request_timeout_s=settings.request_timeout_s,
                    max_inflight_per_runtime=settings.max_inflight_per_runtime,
                    token=settings.runtime_token)
    resolver = Resolver(catalog, settings.base_model_path.resolve().name, settings.redis_url)
    catalog.on_change(resolver.invalidate)
    stats = ExperimentStats(redis)
    rate_limiter = RateLimiter(redis, fail_open=settings.ratelimit_fail_open)
    metrics = Metrics(router.cache_figures, router.load_figures)
    background = Background()
    scores = ScoreBook(redis)
    rollout_stats = RolloutStats(redis, scores)
    answers = AnswerLog(redis, ttl_s=settings.feedback_ttl_s,
                        max_entries=settings.feedback_max_entries, scores=scores)
    rollouts = RolloutController(catalog, rollout_stats, metrics, tick_s=settings.rollout_tick_s)
    pipeline = Pipeline(resolver, rate_limiter, router, metrics, stats, Shadow(router, stats),
                        background, rollout_stats=rollout_stats, answers=answers)
    parts = [
        Part("catalog database", stop=engine.dispose),
        *([Part("redis", stop=redis.aclose)] if redis is not None else []),
        Part("runtime probe client", stop=runtime_http.aclose),
        Part("auth", auth.start, auth.stop),
        Part("resolver", resolver.start, resolver.stop),
        Part("router", router.start, router.stop),
        Part("experiment stats", stats.start, stats.stop),  # flushes after the tasks below
        Part("rollout decisions", rollouts.start, rollouts.stop),
        Part("background", stop=background.stop),
        *extra_parts,
    ]
    return Services(
        settings=settings, catalog=catalog, auth=auth, db_engine=engine, redis=redis,
        router=router, rate_limiter=rate_limiter, metrics=metrics, resolver=resolver,
        experiment_stats=stats, rollout_stats=rollout_stats, rollouts=rollouts,
        answers=answers, background=background, pipeline=pipeline, parts=parts,
    )


def _lifespan(services: Services) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_app: Litestar) -> AsyncIterator[None]:
        try:
            await services.start()
            yield
        finally:
            await services.close()

    return lifespan


def _provide_services(state: State) -> Services:
    services: Services = state.services
    return services


def _openapi() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="loragate",
        version=API_VERSION,
        # The document describes every route, the admin API's included: it takes a token.
        openapi_router=LitestarRouter(path="/schema", route_handlers=[],
                                      guards=[require_any_token], include_in_schema=False),
        components=Components(
            security_schemes={
                "bearer": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    description="the admin token, or a tenant key lg_<prefix>_<secret>",
                )
            }
        ),
    )


def create_app(
    settings: Settings, services: Services | None = None, *, extra_parts: Sequence[Part] = ()
) -> Litestar:
    """The gateway app. `services`: a test's own (else built from settings); `extra_parts`
    join the order of the services built here."""
    if services is None:
        services = build_services(settings, extra_parts)
    elif extra_parts:
        raise ValueError("extra_parts join services that create_app builds, not ones passed in")
    route_handlers: list[Any] = [*ops.routes, *admin.routes, *openai.routes,
                                     *feedback.routes]
    return Litestar(
        route_handlers=route_handlers,
        state=State({"services": services}),
        dependencies={"services": Provide(_provide_services, sync_to_thread=False)},
        lifespan=[_lifespan(services)],
        exception_handlers=errors.EXCEPTION_HANDLERS,
        openapi_config=_openapi(),
        request_max_body_size=settings.max_request_bytes,
        # The CLI configures logging; an app must not reconfigure the process's loggers.
        logging_config=None,
        debug=False,
    )
