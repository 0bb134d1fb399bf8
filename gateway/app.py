"""The application factory: `create_app(settings)` builds the whole gateway.

Nothing here reads the environment or runs at import: settings come in, services are
built from them (or passed in by tests), and the lifespan opens and closes what they hold.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from gateway import errors
from gateway.api.routes import admin, ops
from gateway.services import Services, build_services
from gateway.settings import Settings

API_VERSION = "1"


def _provide_services(state: State) -> Services:
    services: Services = state.services
    return services


def _openapi() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="loragate",
        version=API_VERSION,
        path="/schema",
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


def _wire_inference(services: Services) -> list[Any]:
    """Inference parts: fill the Services slots and return their route handlers.

    Owned by the inference engineer (OpenAI routes, router, rate limits, metrics, A/B).
    """
    # --- inference wiring (begin) ----------------------------------------------------------
    import httpx

    from gateway.api.routes import openai
    from gateway.inference.experiments import ExperimentStats
    from gateway.inference.metrics import Metrics
    from gateway.inference.ratelimit import RateLimiter
    from gateway.inference.resolver import Resolver
    from gateway.inference.router import Router
    from gateway.inference.shadow import Background

    settings = services.settings
    # Runtime traffic gets a pool of its own, sized for many concurrent streams.
    runtime_http = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        timeout=httpx.Timeout(settings.request_timeout_s, connect=5.0),
    )
    router = Router(runtime_http, settings.runtimes, services.redis,
                    request_timeout_s=settings.request_timeout_s,
                    max_inflight_per_runtime=settings.max_inflight_per_runtime)
    resolver = Resolver(services.catalog, settings.base_model_path.resolve().name,
                        settings.redis_url)
    stats = ExperimentStats(services.redis)
    services.router = router
    services.resolver = resolver
    services.rate_limiter = RateLimiter(services.redis, fail_open=settings.ratelimit_fail_open)
    services.metrics = Metrics(router.cache_figures, router.load_figures)
    services.experiment_stats = stats
    services.background = Background(router, stats)
    services.runtime_probe = router.probe
    services.on_catalog_change.append(resolver.invalidate)
    services.on_startup += [resolver.start, router.start, stats.start]
    services.on_shutdown += [runtime_http.aclose, router.stop, resolver.stop, stats.stop,
                             services.background.stop]
    return list(openai.routes)
    # --- inference wiring (end) ------------------------------------------------------------


def create_app(settings: Settings, services: Services | None = None) -> Litestar:
    services = services if services is not None else build_services(settings)
    route_handlers: list[Any] = [*ops.routes, *admin.routes]
    route_handlers += _wire_inference(services)
    return Litestar(
        route_handlers=route_handlers,
        state=State({"services": services}),
        dependencies={"services": Provide(_provide_services, sync_to_thread=False)},
        lifespan=[services.lifespan],
        exception_handlers=errors.EXCEPTION_HANDLERS,
        openapi_config=_openapi(),
        request_max_body_size=settings.max_request_bytes,
        # The CLI configures logging; an app must not reconfigure the process's loggers.
        logging_config=None,
        debug=False,
    )
