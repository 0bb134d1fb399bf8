"""Which runtime serves a request, and the retry rules around it.

Placement: rendezvous (highest random weight) hashing of the adapter's sha256 over the
healthy runtimes, so one adapter keeps landing where it is already resident; bounded load
("consistent hashing with bounded loads"): a runtime already holding more than
`load_factor` times the mean in-flight count is skipped, so a hot adapter spills over to
the next runtime in its order rather than queueing behind itself. Base-model requests are
placed the same way by their tenant (`affinity_key`): a runtime's prefix cache is per tenant,
so one tenant's system prompt stays cached where its requests land; bounded load spreads a
busy tenant as it spreads a hot adapter. `candidates(None)` is plain least-loaded.

Failures: a circuit breaker per runtime opens after `failure_threshold` consecutive
connection failures and lets one trial request through after `cooldown_s` (half-open). A
request is retried on the next runtime when the connection fails or the runtime answers 503
before the first token; once a token has been produced it is never retried (the client may
have seen it). Runtimes come from `--runtimes`, from DNS names (`dns+http://NAME:PORT`,
gateway/inference/discovery.py) and from the Redis registry (`loragate:runtime:*`), refreshed
with their `/health` and `/stats` every `probe_interval_s`. A runtime that leaves drains: no
new request goes to it, those in flight finish on it, and its state (in-flight count
included) is kept until they have, so one that comes back is counted right.

Shedding: each runtime takes at most `capacity(state)` requests in flight from this gateway;
when every usable runtime is at that cap the request is answered 503 at once (code
`overloaded`, Retry-After) instead of joining a queue that only grows, so past capacity the
latency of what is admitted stays bounded and the excess is refused cheaply. A slot is held
from the moment a runtime is chosen until the request's generator ends (finish, error, or
the client going away, which closes the generator), in one `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.errors import BadRequest, Unavailable
from gateway.inference.runtime_client import (
    RuntimeBusy,
    RuntimeClient,
    RuntimeRefused,
    RuntimeUnreachable,
)
from runtime.protocol import ErrorEvent, Event, FinishEvent, GenerateBody, TokenEvent

logger = logging.getLogger("loragate.gateway.router")
MAX_ATTEMPTS = 3
# Default in-flight cap per runtime: this many times the runtime's `max_running` (its batch
# size, from /stats "limits"). One batch running and one batch's worth waiting keeps the
# runtime's batch full between steps (a finished request's place is taken at once), while a
# request admitted at the cap waits for at most about one batch's generation before it runs:
# its latency stays within ~2x of an unloaded one. Relative to max_running, the same rule
# fits a CPU runtime (small batches) and a GPU one (hundreds), where a fixed number would
# starve one or drown the other.
INFLIGHT_PER_RUNNING = 2
# For a runtime whose /stats does not report its limits: RuntimeConfig's default max_running.
DEFAULT_MAX_RUNNING = 64
# At the cap the queue drains in about one batch's generation time: seconds, not minutes.
SHED_RETRY_AFTER_S = 1
SHED_REASONS = ("at_capacity", "runtime_busy", "no_runtime")


@dataclass(frozen=True, slots=True)
class RuntimeHealth:
    url: str
    ready: bool  # base model loaded and admitting requests
    detail: str  # "ok", "draining", "HTTP 503", "unreachable: ConnectError"


class RuntimeState:
    def __init__(self, url: str) -> None:
        self.url = url
        self.healthy = False
        self.detail = "not probed yet"
        self.in_flight = 0
        self.failures = 0  # consecutive connection failures
        self.open_until = 0.0  # breaker open while now < open_until
        self.trial_running = False  # half-open: one request tests the runtime
        self.stats: dict[str, Any] = {}

    def breaker(self, now: float) -> str:
        if self.open_until == 0.0:
            return "closed"
        return "open" if now < self.open_until else "half_open"

    def usable(self, now: float) -> bool:
        state = self.breaker(now)
        if state == "closed":
            return self.healthy
        return state == "half_open" and not self.trial_running


def affinity_key(tenant: str, adapter_sha256: str | None) -> str:
    """What a request is placed by: its adapter's weights (where they are resident), or for
    the base model its tenant (where its prompts are in the prefix cache)."""
    return adapter_sha256 if adapter_sha256 else f"base-model/{tenant}"


def rendezvous_order(key: str, urls: Sequence[str]) -> list[str]:
    def score(url: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{key}|{url}".encode()).digest()[:8], "big")

    return sorted(urls, key=score, reverse=True)


class Router:
    def __init__(
        self,
        http: httpx.AsyncClient,
        static_urls: Sequence[str] = (),
        redis: Any = None,
        *,
        request_timeout_s: float = 300.0,
        probe_interval_s: float = 2.0,
        failure_threshold: int = 3,
        cooldown_s: float = 5.0,
        load_factor: float = 1.25,
        max_inflight_per_runtime: int = 0,
        client: Any = None,
        token: str | None = None,
        discovery: Any = None,
    ) -> None:
        """`token`: LORAGATE_RUNTIME_TOKEN, sent with /stats probes and /generate calls.
        `discovery`: a source of runtime URLs with `async urls() -> frozenset[str]`
        (gateway/inference/discovery.py DnsDiscovery), asked at every probe round."""
        self.http = http  # health and stats probes
        # /generate traffic
        self.client = client if client is not None else RuntimeClient(token=token)
        self._probe_headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.static_urls = tuple(static_urls)
        self.redis = redis
        self.request_timeout_s = request_timeout_s
        self.probe_interval_s = probe_interval_s
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.load_factor = load_factor
        self.max_inflight_per_runtime = max_inflight_per_runtime  # 0: derived per runtime
        self.shed: dict[str, int] = dict.fromkeys(SHED_REASONS, 0)  # refusals, by reason
        self.runtimes: dict[str, RuntimeState] = {u: RuntimeState(u) for u in self.static_urls}
        self.discovery = discovery
        self.draining: dict[str, RuntimeState] = {}  # gone, with requests still in flight
        self._task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- membership, health

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await self.refresh()
            except Exception:  # a probe round failing must not end probing
                logger.exception("runtime refresh failed")

    async def refresh(self) -> None:
        urls = set(self.static_urls)
        if self.redis is not None:
            from runtime.http.registry import list_runtimes

            try:
                urls |= {str(entry["url"]).rstrip("/") for entry in await list_runtimes(self.redis)}
            except Exception as exc:  # Redis down: keep the runtimes we know
                logger.warning("runtime registry unreadable: %s", type(exc).__name__)
                urls |= set(self.runtimes)
        if self.discovery is not None:
            urls |= await self.discovery.urls()  # keeps its last answer when DNS fails
        self.set_members(urls)
        await asyncio.gather(*(self._probe(s) for s in list(self.runtimes.values())))

    def set_members(self, urls: set[str] | frozenset[str]) -> None:
        """Make `urls` the runtimes requests may go to; the others drain (see the module
        docstring)."""
        for url in sorted(urls - set(self.runtimes)):  # one order whatever the hash seed
            back = self.draining.pop(url, None)
            self.runtimes[url] = back if back is not None else RuntimeState(url)
        for url in set(self.runtimes) - urls:
            state = self.runtimes.pop(url)
            if state.in_flight:
                self.draining[url] = state
        self.draining = {u: s for u, s in self.draining.items() if s.in_flight}

    async def _probe(self, state: RuntimeState) -> None:
        try:
            response = await self.http.get(f"{state.url}/health", timeout=2.0)
            status = response.json().get("status") if response.status_code == 200 else None
            state.healthy = status == "ok"
            state.detail = str(status) if status else f"HTTP {response.status_code}"
            if state.healthy:
                stats = await self.http.get(f"{state.url}/stats", timeout=2.0,
                                            headers=self._probe_headers)
                if stats.status_code == 200:
                    state.stats = stats.json()
        except (httpx.HTTPError, ValueError) as exc:
            state.healthy = False
            state.detail = f"unreachable: {type(exc).__name__}"

    async def probe(self) -> Sequence[RuntimeHealth]:
        """For /readyz: the runtimes as of the last probe round."""
        if not any(s.healthy for s in self.runtimes.values()):
            await self.refresh()  # readiness asked before the first round finished
        return [RuntimeHealth(s.url, s.healthy, s.detail) for s in self.runtimes.values()]

    # ------------------------------------------------------------------------ placement

    def candidates(self, affinity: str | None) -> list[RuntimeState]:
        """Usable runtimes in the order to try them: by rendezvous on `affinity` within the
        load bound, then those over it; with no affinity, least loaded first."""
        now = time.monotonic()
        usable = [s for s in self.runtimes.values() if s.usable(now)]
        if not usable:
            return []
        if affinity is None:
            return sorted(usable, key=lambda s: s.in_flight)
        ordered = [self.runtimes[u] for u in rendezvous_order(affinity, [s.url for s in usable])]
        total = sum(s.in_flight for s in usable) + 1
        bound = max(1, math.ceil(self.load_factor * total / len(usable)))
        within = [s for s in ordered if s.in_flight < bound]
        return within + [s for s in ordered if s.in_flight >= bound]

    def under_cap(self, ordered: Sequence[RuntimeState]) -> list[RuntimeState]:
        """`ordered` without the runtimes at their cap: placement order kept, a full runtime
        passed over like an unhealthy one. With `candidates`, the choice `generate` makes
        (bench/fleet_sim.py drives these two at fleet scale)."""
        return [s for s in ordered if s.in_flight < self.capacity(s)]

    def capacity(self, state: RuntimeState) -> int:
        """Requests this gateway lets `state` hold at once (see INFLIGHT_PER_RUNNING)."""
        if self.max_inflight_per_runtime > 0:
            return self.max_inflight_per_runtime
        limits = state.stats.get("limits")
        max_running = limits.get("max_running") if isinstance(limits, dict) else None
        if isinstance(max_running, bool) or not isinstance(max_running, int) or max_running < 1:
            max_running = DEFAULT_MAX_RUNNING
        return INFLIGHT_PER_RUNNING * max_running

    def _failed(self, state: RuntimeState) -> None:
        state.failures += 1
        state.trial_running = False
        if state.failures >= self.failure_threshold or state.open_until:
            state.open_until = time.monotonic() + self.cooldown_s
            logger.warning("circuit open for %s after %d failures", state.url, state.failures)

    @staticmethod
    def _succeeded(state: RuntimeState) -> None:
        state.failures = 0
        state.open_until = 0.0
        state.trial_running = False

    # ------------------------------------------------------------------------ requests

    async def generate(self, body: GenerateBody, affinity: str | None
                       ) -> AsyncGenerator[Event, None]:
        """Events of one request. Raises `Unavailable` when no runtime could take it and
        `BadRequest` when the runtime refused it; a failure after the first token ends the
        stream with an ErrorEvent (code `runtime_failed`) instead of raising."""
        candidates = self.candidates(affinity)
        if not candidates:
            self.shed["no_runtime"] += 1
            raise Unavailable("no healthy runtime", code="no_runtime", retry_after=2)
        candidates = self.under_cap(candidates)
        if not candidates:
            self.shed["at_capacity"] += 1
            raise Unavailable("every runtime is at its limit of requests in flight",
                              code="overloaded", retry_after=SHED_RETRY_AFTER_S)
        retry_after = 1
        shed_reason: str | None = None  # None: the tries failed, nothing was full
        deadline = time.monotonic() + self.request_timeout_s
        for state in candidates[:MAX_ATTEMPTS]:
            if state.in_flight >= self.capacity(state):
                shed_reason = "at_capacity"  # filled up while an earlier try was under way
                continue
            if state.breaker(time.monotonic()) == "half_open":
                state.trial_running = True
            state.in_flight += 1
            try:
                produced = False
                try:
                    stream = await self.client.open_generate(state.url, body,
                                                             _loop_deadline(deadline))
                except RuntimeBusy as exc:
                    state.trial_running = False
                    retry_after = exc.retry_after
                    shed_reason = "runtime_busy"
                    continue
                except RuntimeRefused as exc:
                    self._succeeded(state)
                    raise BadRequest(str(exc), code=exc.code) from None
                except RuntimeUnreachable as exc:
                    logger.warning("runtime %s failed before the first token: %s", state.url, exc)
                    self._failed(state)
                    continue
                except TimeoutError:
                    raise Unavailable("the runtime did not answer in time", code="timeout",
                                      retry_after=1) from None
                try:
                    pending: list[Event] = []  # held until the first token: retry stays safe
                    ended = False
                    async for event in stream.events():
                        if not produced and not isinstance(event, TokenEvent | ErrorEvent):
                            pending.append(event)
                            continue
                        if not produced:
                            produced = True
                            self._succeeded(state)
                            for held in pending:
                                yield held
                        yield event
                        ended = isinstance(event, FinishEvent | ErrorEvent)
                    if not ended:
                        raise RuntimeUnreachable("the stream ended before its last event")
                except RuntimeUnreachable as exc:
                    self._failed(state)
                    if not produced:
                        logger.warning("runtime %s failed before the first token: %s",
                                       state.url, exc)
                        continue
                    yield ErrorEvent("runtime_failed", "the runtime serving this request failed")
                except TimeoutError:
                    yield ErrorEvent("timeout", "the request took longer than its time limit")
                finally:
                    # Shielded: a cancelled client must still close the runtime's stream.
                    await asyncio.shield(stream.aclose())
                return
            finally:
                state.in_flight -= 1
        if shed_reason is not None:
            self.shed[shed_reason] += 1
        raise Unavailable("no runtime could take the request",
                          code="no_runtime" if shed_reason is None else "overloaded",
                          retry_after=retry_after)

    def max_model_len(self) -> int | None:
        """The longest context of the healthy runtimes, from their /stats "limits"; None
        while none has reported one."""
        lengths = []
        for state in self.runtimes.values():
            limits = state.stats.get("limits") if state.healthy else None
            length = limits.get("max_model_len") if isinstance(limits, dict) else None
            if isinstance(length, int) and not isinstance(length, bool) and length > 0:
                lengths.append(length)
        return max(lengths, default=None)

    def cache_figures(self) -> dict[str, dict[str, Any]]:
        """The runtimes' latest /stats, for /metrics."""
        return {url: s.stats for url, s in self.runtimes.items() if s.stats}

    def load_figures(self) -> dict[str, Any]:
        """In-flight counts against their caps per runtime (draining ones too), refusals by
        reason and the runtimes known by state, for /metrics."""
        members = {"ready": sum(s.healthy for s in self.runtimes.values()),
                   "not_ready": sum(not s.healthy for s in self.runtimes.values()),
                   "draining": len(self.draining)}
        return {"shed": dict(self.shed), "members": members,
                "dns_failures": getattr(self.discovery, "failures", 0),
                "runtimes": {url: {"in_flight": s.in_flight, "limit": self.capacity(s)}
                             for url, s in {**self.draining, **self.runtimes}.items()}}


def _loop_deadline(deadline_monotonic: float) -> float:
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline_monotonic - time.monotonic())
