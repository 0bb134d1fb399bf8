"""The gateway's long-lived parts, typed, and the one ordered list that starts and stops them.

`gateway.app.build_services(settings)` constructs every part at once; routes reach them as
`request.app.state.services` (or a `services: NamedDependency[Services]` argument). Nothing
is filled in later: a test that wants another part passes its own Services to `create_app`
or replaces an attribute before the first request.

`parts` is the start order; `close()` stops them in reverse, so a part is stopped before
anything it uses (shadow and book-keeping tasks before the router they call, the router
before the HTTP client it probes with, everything before the database and Redis).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import text

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncEngine

    from adapters.catalog import Catalog
    from gateway.auth import Authenticator
    from gateway.inference.experiments import ExperimentStats
    from gateway.inference.feedback import AnswerLog
    from gateway.inference.metrics import Metrics
    from gateway.inference.pipeline import Background, Pipeline
    from gateway.inference.ratelimit import RateLimiter
    from gateway.inference.resolver import Resolver
    from gateway.inference.rollouts import RolloutController, RolloutStats
    from gateway.inference.router import Router, RuntimeHealth
    from gateway.settings import Settings

logger = logging.getLogger("loragate.gateway")

Hook = Callable[[], Awaitable[None]]
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Part:
    """One entry of the start/stop order: what to run when the app starts and stops."""

    name: str
    start: Hook | None = None
    stop: Hook | None = None


class RuntimeProbe(Protocol):
    async def __call__(self) -> Sequence[RuntimeHealth]: ...


class Services:
    """A plain class on purpose: Litestar would validate a dataclass field by field on every
    injection, and these parts are ours, not request input."""

    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        auth: Authenticator,
        db_engine: AsyncEngine,
        redis: Redis | None,
        router: Router,
        rate_limiter: RateLimiter,
        metrics: Metrics,
        resolver: Resolver,
        experiment_stats: ExperimentStats,
        rollout_stats: RolloutStats,
        rollouts: RolloutController,
        answers: AnswerLog,
        background: Background,
        pipeline: Pipeline,
        parts: Sequence[Part],
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.auth = auth
        self.db_engine = db_engine
        self.redis = redis
        self.router = router
        self.rate_limiter = rate_limiter
        self.metrics = metrics
        self.resolver = resolver
        self.experiment_stats = experiment_stats  # GET experiment shows its figures
        self.rollout_stats = rollout_stats  # per (rollout, stage, arm); GET rollout shows them
        self.rollouts = rollouts  # this replica's decision loop
        self.answers = answers  # completion id -> what served it, for POST /v1/feedback
        self.background = background  # book-keeping and shadow tasks after an answer
        self.pipeline = pipeline  # one inference request: resolve, assign, limit, route, book
        # /readyz asks this; a test may swap in its own before asking.
        self.runtime_probe: RuntimeProbe = router.probe
        self.parts = tuple(parts)

    async def start(self) -> None:
        for part in self.parts:
            if part.start is not None:
                await part.start()

    async def close(self) -> None:
        """Stop every part, in reverse order; one failing to stop does not keep the rest
        running. Safe after a start that failed half-way: each stop tolerates a part that
        never started."""
        for part in reversed(self.parts):
            if part.stop is None:
                continue
            try:
                await part.stop()
            except Exception:
                logger.exception("stopping %s failed", part.name)

    async def catalog_status(self) -> str:
        """'ok', or why the catalog's database cannot be reached."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                async with self.db_engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except Exception as exc:  # any driver or timeout error means "not reachable"
            return f"unreachable: {type(exc).__name__}"
        return "ok"
