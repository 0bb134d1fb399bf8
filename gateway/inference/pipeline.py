"""One inference request after auth, in call order: resolve -> assign -> limit -> route -> book.

`Pipeline.send` resolves the model name (cached, resolver.py), assigns an experiment's
variant (experiments.py), takes the request from the tenant's budget (ratelimit.py),
addresses the runtime body (tenant, adapter) and opens it on a runtime (router.py, which may
retry on another runtime before the first token). The `Inference` it returns yields the
events once, as the tenant may see them; the route writes them whole or as SSE chunks.
Book-keeping (metrics, the tokens charged to the tenant, experiment figures, the shadow
copy) runs after the answer in a background task, so it never delays or changes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.errors import BadRequest, GatewayError, Unavailable, spec_for
from gateway.inference import experiments as ab
from gateway.inference.runtime_client import Collected, adapter_body
from runtime.protocol import ErrorEvent, Event, GenerateBody, TokenEvent

if TYPE_CHECKING:
    from adapters.views import ExperimentView, ResolvedAdapter
    from gateway.auth import TenantPrincipal
    from gateway.inference.experiments import ExperimentStats
    from gateway.inference.metrics import Metrics
    from gateway.inference.ratelimit import RateLimiter
    from gateway.inference.resolver import Resolver
    from gateway.inference.router import Router
    from gateway.inference.shadow import Shadow

logger = logging.getLogger("loragate.gateway.openai")


@dataclass(frozen=True, slots=True)
class Plan:
    """What serves one request, decided before it is sent."""

    tenant: str
    tokens_per_minute: int | None
    adapter: ResolvedAdapter | None
    experiment: ExperimentView | None
    variant: str | None
    started: float  # time.perf_counter() once planned: latencies count from here

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.adapter is not None:
            headers["X-Loragate-Adapter"] = f"{self.adapter.name}@{self.adapter.version}"
        if self.variant is not None:
            headers["X-Loragate-Variant"] = self.variant
        return headers


@dataclass(frozen=True, slots=True)
class Outcome:
    """What book-keeping needs once an answer is out."""

    plan: Plan
    body: GenerateBody  # as sent to the runtime; the shadow copy is made from it
    got: Collected
    status: int  # the HTTP status the client got
    ttft_s: float | None


class Background:
    """Tasks that run after an answer (book-keeping, shadow copies); `stop` cancels them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(self._guard(work))
        self._tasks.add(task)  # a reference, or the loop may drop the task mid-way
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _guard(work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:  # book-keeping must never surface; the answer is already out
            logger.exception("background work failed")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def for_tenant(error: ErrorEvent, plan: Plan) -> ErrorEvent:
    """The runtime's error as the tenant may see it.

    An adapter load failure's message is written for operators: it carries the artifact
    store's endpoint URL, bucket, prefix or file path. It goes to the log; the tenant gets a
    fixed sentence naming the adapter and the artifact store instead.
    """
    if error.code != "adapter_load_failed":
        return error
    name = f"{plan.adapter.name}@{plan.adapter.version}" if plan.adapter else "the adapter"
    logger.warning("tenant %s, adapter %s: %s", plan.tenant, name, error.message)
    return ErrorEvent(error.code, f"adapter {name} could not be loaded: its artifact could not "
                      "be fetched from the artifact store or is unusable; try again later")


def error_for(error: ErrorEvent) -> GatewayError:
    """The HTTP error of a whole answer whose stream ended with `error`."""
    if error.code in ("invalid_request", "prompt_too_long", "context_length_exceeded"):
        return BadRequest(error.message, code=error.code)
    return Unavailable(error.message, code=error.code, retry_after=1)


class Inference:
    """One request sent to a runtime. Read it once: `collect()` for a whole answer, or
    `events()` for a stream followed by `close()`. Either way it is booked exactly once."""

    def __init__(self, pipeline: Pipeline, plan: Plan, body: GenerateBody,
                 events: AsyncGenerator[Event, None]) -> None:
        self.plan = plan
        self.body = body
        self.got = Collected()
        self.ttft_s: float | None = None
        self._pipeline = pipeline
        self._events = events
        self._first: Event | None = None

    async def open(self) -> None:
        """Wait for the first event: no runtime, a refusal or a full queue raise here."""
        try:
            self._first = await anext(self._events)
        except GatewayError as exc:
            self._book(spec_for(exc).status)
            raise

    async def events(self) -> AsyncIterator[Event]:
        """Every event once, the first included, gathered into `got` as they pass."""
        if self._first is not None:
            first, self._first = self._first, None
            yield self._take(first)
        async for event in self._events:
            yield self._take(event)

    def _take(self, event: Event) -> Event:
        if isinstance(event, TokenEvent) and self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.plan.started
        elif isinstance(event, ErrorEvent):
            event = for_tenant(event, self.plan)
        self.got.add(event)
        return event

    async def collect(self) -> Collected:
        """The whole answer; a stream that ended in an error raises the client's error."""
        try:
            async for _ in self.events():
                pass
            if self.got.error is not None:
                raise error_for(self.got.error)
        except GatewayError as exc:
            self._book(spec_for(exc).status)
            raise
        self._book(200)
        return self.got

    async def close(self) -> None:
        """After a streamed answer, however it ended (the client may have left): close the
        runtime's stream, which aborts the request there, and book it. Its status line (200)
        went out before the first chunk, whatever followed."""
        # Shielded: a cancelled client must still close the runtime's stream.
        await asyncio.shield(self._events.aclose())
        self._book(200)

    def _book(self, status: int) -> None:
        self._pipeline.book(Outcome(self.plan, self.body, self.got, status, self.ttft_s))


class Pipeline:
    def __init__(self, resolver: Resolver, rate_limiter: RateLimiter, router: Router,
                 metrics: Metrics, stats: ExperimentStats, shadow: Shadow,
                 background: Background) -> None:
        self.resolver = resolver
        self.rate_limiter = rate_limiter
        self.router = router
        self.metrics = metrics
        self.stats = stats
        self.shadow = shadow
        self.background = background

    async def send(self, principal: TenantPrincipal, model: str, user: str | None,
                   body: GenerateBody) -> Inference:
        """Plan the request, address `body` to what serves it, and open it on a runtime.
        `user` is the A/B identity (None: a random variant)."""
        plan = await self.plan(principal, model, user)
        body = msgspec.structs.replace(body, tenant=plan.tenant,
                                       adapter=adapter_body(plan.tenant, plan.adapter))
        key = plan.adapter.ref.key if plan.adapter is not None else None
        inference = Inference(self, plan, body, self.router.generate(body, key))
        await inference.open()
        return inference

    async def plan(self, principal: TenantPrincipal, model: str, user: str | None) -> Plan:
        resolution = await self.resolver.resolve(principal.tenant, model)
        adapter, variant, experiment = resolution.adapter, None, resolution.experiment
        if experiment is not None:
            chosen = ab.assign(experiment, user)
            adapter, variant = chosen.resolved, chosen.name
        await self.rate_limiter.admit(principal.tenant, principal.requests_per_minute,
                                      principal.tokens_per_minute)
        return Plan(principal.tenant, principal.tokens_per_minute, adapter, experiment, variant,
                    time.perf_counter())

    def book(self, outcome: Outcome) -> None:
        self.background.spawn(self._after(outcome))

    async def _after(self, outcome: Outcome) -> None:
        """Book-keeping once the answer is out: metrics, token charge, A/B figures, shadow."""
        plan, got = outcome.plan, outcome.got
        total_s = time.perf_counter() - plan.started
        adapter = plan.adapter.name if plan.adapter is not None else "base"
        labels = self.metrics.labels(plan.tenant, adapter, plan.variant or "")
        self.metrics.observe(labels, status=outcome.status, ttft_s=outcome.ttft_s,
                             total_s=total_s, tokens_in=got.prompt_tokens,
                             tokens_out=got.num_completion_tokens)
        await self.rate_limiter.charge_tokens(plan.tenant, plan.tokens_per_minute,
                                              got.num_tokens)
        if plan.experiment is None or plan.variant is None:
            return
        ok = outcome.status == 200 and got.error is None
        await self.stats.record(
            plan.tenant, plan.experiment.name, plan.variant, ok=ok, latency_s=total_s,
            tokens_in=got.prompt_tokens, tokens_out=got.num_completion_tokens)
        if ok:
            await self.shadow.after(plan.tenant, plan.experiment, outcome.body, got.output)
