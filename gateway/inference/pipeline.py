"""One inference request after auth, in call order: resolve -> assign -> limit -> route -> book.

`Pipeline.send` resolves the model name (cached, resolver.py), assigns an experiment's
variant (experiments.py) or a running rollout's arm (rollouts.py), takes the request and a
reservation of the tokens it can use from the tenant's budget (ratelimit.py), addresses the
runtime body (tenant, adapter) and opens it on a runtime (router.py, which may retry on
another runtime before the first token), then keeps what served the answer under its
completion id for feedback (feedback.py) before the client can see that id. The `Inference`
it returns yields the events once, as the tenant may see them; the route writes them whole
or as SSE chunks. Book-keeping (settling the reservation to the tokens used, metrics,
experiment and rollout figures, the shadow copy) runs after the answer in a background task,
so it never delays or changes it; every way a request ends books it exactly once, so the
reservation is always settled.
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

from gateway.errors import AdapterUnusable, BadRequest, GatewayError, Unavailable, spec_for
from gateway.inference import experiments as ab
from gateway.inference import rollouts
from gateway.inference.feedback import Served
from gateway.inference.ratelimit import reservation
from gateway.inference.router import affinity_key
from gateway.inference.runtime_client import Collected, adapter_body
from runtime.protocol import ErrorEvent, Event, GenerateBody, StartEvent, TokenEvent

if TYPE_CHECKING:
    from adapters.views import ExperimentView, ResolvedAdapter, ResolvedRollout
    from gateway.auth import TenantPrincipal
    from gateway.inference.experiments import ExperimentStats
    from gateway.inference.feedback import AnswerLog
    from gateway.inference.metrics import Metrics
    from gateway.inference.ratelimit import RateLimiter
    from gateway.inference.resolver import Resolver
    from gateway.inference.rollouts import RolloutStats
    from gateway.inference.router import Router
    from gateway.inference.shadow import Shadow

logger = logging.getLogger("loragate.gateway.openai")
# No token of the served tokenizers covers more than this many bytes of text (SmolLM2's
# longest is 81, a newline and 80 spaces; Llama 3's and Qwen2's are runs of spaces or
# punctuation of about 128), so a prompt of more than max_model_len times this many bytes has
# more tokens than the context holds, whatever the tokenizer: it is refused on its byte
# length, before a runtime spends seconds tokenizing megabytes only to refuse it then.
PROMPT_BYTES_PER_TOKEN = 256


def check_prompt_bytes(body: GenerateBody, max_model_len: int | None) -> None:
    """BadRequest (prompt_too_long, like the runtime's) for a text prompt that cannot fit."""
    if max_model_len is None or body.prompt_token_ids is not None:
        return  # ids are counted by the runtime at no cost
    if body.messages is not None:
        size, param = sum(len(m.content.encode()) for m in body.messages), "messages"
    else:
        size, param = len((body.prompt or "").encode()), "prompt"
    limit = max_model_len * PROMPT_BYTES_PER_TOKEN
    if size > limit:
        raise BadRequest(
            f"the prompt is {size} bytes and this model's context holds {max_model_len} "
            f"tokens: no prompt over {limit} bytes fits in it", code="prompt_too_long",
            param=param)


@dataclass(frozen=True, slots=True)
class Plan:
    """What serves one request, decided before it is sent."""

    tenant: str
    tokens_per_minute: int | None
    adapter: ResolvedAdapter | None
    experiment: ExperimentView | None
    variant: str | None  # the experiment's variant, or the rollout's arm
    started: float  # time.perf_counter() once planned: latencies count from here
    reserved: int = 0  # tokens taken from the tenant's budget at admission, settled after
    rollout: ResolvedRollout | None = None  # set when `variant` is a running rollout's arm

    def served(self) -> Served:
        """What feedback on this answer is booked to."""
        return Served(
            tenant=self.tenant,
            adapter=self.adapter.name if self.adapter is not None else None,
            version=self.adapter.version if self.adapter is not None else None,
            experiment_id=self.experiment.id if self.experiment is not None else None,
            variant=self.variant if self.experiment is not None else None,
            rollout_id=self.rollout.id if self.rollout is not None else None,
            stage=self.rollout.stage if self.rollout is not None else None,
            arm=self.variant if self.rollout is not None else None,
        )

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
    status: int  # the HTTP status the client got (499: it went away first; 500: a fault)
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

    async def drain(self) -> None:
        """Wait until every task spawned so far (and any they spawn) has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

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
    fixed sentence naming the adapter and the artifact store instead, and which says whether
    trying again can help: only when the store could not be reached (the runtime's message
    then says "unreachable"); a missing object, a wrong sha256 or weights that do not parse
    stay so (error_for: a 500 without Retry-After).
    """
    if error.code != "adapter_load_failed":
        return error
    name = f"{plan.adapter.name}@{plan.adapter.version}" if plan.adapter else "the adapter"
    logger.warning("tenant %s, adapter %s: %s", plan.tenant, name, error.message)
    if "unreachable" in error.message:
        return ErrorEvent(error.code, f"adapter {name} could not be loaded: its artifact could "
                          "not be fetched from the artifact store; try again later")
    return ErrorEvent(error.code, f"adapter {name} could not be loaded: its artifact is missing "
                      f"from the artifact store or unusable; {_FOR_GOOD}")


# How for_tenant's message of a permanent load failure ends; error_for tells it by this, so
# the code the tenant sees stays adapter_load_failed either way.
_FOR_GOOD = "trying again will not help until a new version is uploaded"


def error_for(error: ErrorEvent) -> GatewayError:
    """The HTTP error of an answer whose stream ended with `error` (before any token, or
    anywhere in a whole answer)."""
    if error.code in ("invalid_request", "prompt_too_long", "context_length_exceeded"):
        return BadRequest(error.message, code=error.code)
    if error.code == "adapter_load_failed" and error.message.endswith(_FOR_GOOD):
        return AdapterUnusable(error.message)
    if error.code == "adapter_numerics":  # the adapter's own weights: a retry gives the same
        return AdapterUnusable(error.message, code=error.code)
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
        self._head: list[Event] = []  # read by open(), not yet passed on
        self._booked = False

    async def open(self) -> None:
        """Wait for the first token (or the end): no runtime, a refusal, a full queue, or an
        error before any token (an adapter that cannot be loaded) raise here, so a stream
        answers the same status as a whole answer would (its status line is not out yet)."""
        try:
            while not self._head or isinstance(self._head[-1], StartEvent):
                self._head.append(await anext(self._events))
        except StopAsyncIteration:
            pass  # ended early: collect() and events() see what came
        except GatewayError as exc:
            self._book(spec_for(exc).status)
            raise
        except BaseException as exc:
            await self._abandon(exc)
            raise
        if self._head and isinstance(self._head[-1], ErrorEvent):
            for event in self._head:
                self._take(event)
            self._head.clear()
            await asyncio.shield(self._events.aclose())
            assert self.got.error is not None
            error = error_for(self.got.error)
            self._book(spec_for(error).status)
            raise error

    async def events(self) -> AsyncIterator[Event]:
        """Every event once, those open() read included, gathered into `got` as they pass."""
        while self._head:
            yield self._take(self._head.pop(0))
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
        except BaseException as exc:
            await self._abandon(exc)
            raise
        self._book(200)
        return self.got

    async def _abandon(self, exc: BaseException) -> None:
        """Ended mid-way by `exc`: the client went away (the handler was cancelled: 499) or a
        fault (500). Close the runtime's stream, which frees its place and aborts it there,
        and book what was used."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self._events.aclose())
        self._book(499 if isinstance(exc, asyncio.CancelledError) else 500)

    async def close(self) -> None:
        """After a streamed answer, however it ended (the client may have left): close the
        runtime's stream, which aborts the request there, and book it. Its status line (200)
        went out before the first chunk, whatever followed."""
        # Shielded: a cancelled client must still close the runtime's stream.
        await asyncio.shield(self._events.aclose())
        self._book(200)

    def _book(self, status: int) -> None:
        if self._booked:
            return
        self._booked = True
        self._pipeline.book(Outcome(self.plan, self.body, self.got, status, self.ttft_s))


class Pipeline:
    def __init__(self, resolver: Resolver, rate_limiter: RateLimiter, router: Router,
                 metrics: Metrics, stats: ExperimentStats, shadow: Shadow,
                 background: Background, *, rollout_stats: RolloutStats,
                 answers: AnswerLog) -> None:
        self.resolver = resolver
        self.rate_limiter = rate_limiter
        self.router = router
        self.metrics = metrics
        self.stats = stats
        self.shadow = shadow
        self.background = background
        self.rollout_stats = rollout_stats
        self.answers = answers

    async def send(self, principal: TenantPrincipal, model: str, user: str | None,
                   body: GenerateBody) -> Inference:
        """Plan the request, address `body` to what serves it, and open it on a runtime.
        `user` is the A/B identity (None: a random variant)."""
        check_prompt_bytes(body, self.router.max_model_len())
        plan = await self.plan(principal, model, user, reservation(body))
        body = msgspec.structs.replace(body, tenant=plan.tenant,
                                       adapter=adapter_body(plan.tenant, plan.adapter))
        key = affinity_key(plan.tenant, plan.adapter.ref.sha256 if plan.adapter else None)
        inference = Inference(self, plan, body, self.router.generate(body, key))
        await inference.open()
        await self.answers.remember(body.request_id, plan.served())
        return inference

    async def plan(self, principal: TenantPrincipal, model: str, user: str | None,
                   tokens: int = 0) -> Plan:
        """What serves the request, admitted with `tokens` reserved from the tenant's budget."""
        resolution = await self.resolver.resolve(principal.tenant, model)
        adapter, variant, experiment = resolution.adapter, None, resolution.experiment
        rollout = resolution.rollout
        if experiment is not None:
            chosen = ab.assign(experiment, user)
            adapter, variant = chosen.resolved, chosen.name
        elif rollout is not None:
            variant = rollouts.assign(rollout, user)
            adapter = rollout.candidate if variant == "candidate" else rollout.stable
        reserved = await self.rate_limiter.reserve(
            principal.tenant, principal.requests_per_minute, principal.tokens_per_minute, tokens)
        return Plan(principal.tenant, principal.tokens_per_minute, adapter, experiment, variant,
                    time.perf_counter(), reserved=reserved, rollout=rollout)

    def book(self, outcome: Outcome) -> None:
        self.background.spawn(self._after(outcome))

    async def _after(self, outcome: Outcome) -> None:
        """Book-keeping once the answer is out: token settlement, metrics, A/B figures,
        shadow."""
        plan, got = outcome.plan, outcome.got
        # First: the tenant's next requests wait on it.
        await self.rate_limiter.settle(plan.tenant, plan.tokens_per_minute, plan.reserved,
                                       got.num_tokens)
        total_s = time.perf_counter() - plan.started
        adapter = plan.adapter.name if plan.adapter is not None else "base"
        labels = self.metrics.labels(plan.tenant, adapter, plan.variant or "")
        self.metrics.observe(labels, status=outcome.status, ttft_s=outcome.ttft_s,
                             total_s=total_s, tokens_in=got.prompt_tokens,
                             tokens_out=got.num_completion_tokens,
                             tokens_cached=got.cached_tokens)
        ok = outcome.status == 200 and got.error is None
        if plan.rollout is not None and plan.variant is not None:
            await self.rollout_stats.record(plan.rollout.id, plan.rollout.stage, plan.variant,
                                            ok=ok, latency_s=total_s)
        if plan.experiment is None or plan.variant is None:
            return
        await self.stats.record(
            plan.tenant, ab.stats_key(plan.experiment), plan.variant, ok=ok, latency_s=total_s,
            tokens_in=got.prompt_tokens, tokens_out=got.num_completion_tokens)
        if ok:
            await self.shadow.after(plan.tenant, plan.experiment, outcome.body, got.output)
