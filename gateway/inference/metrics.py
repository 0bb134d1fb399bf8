"""Prometheus figures of one gateway app, on a registry of its own (never the global one,
so two apps in one process, as in tests, do not collide).

Labels are tenant, adapter and variant. Their cardinality is bounded: each label keeps at
most `max_values` distinct values, later ones are counted under "other", so a tenant with
thousands of adapters cannot blow up the scrape. The runtimes' adapter-cache figures come
from their latest `/stats` (fetched by the router's probe loop) at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from adapters.views import RolloutView

OTHER = "other"
LABELS = ("tenant", "adapter", "variant")
# The runtimes' prefix-cache figures per tenant, as /stats "prefix_cache" names them.
PREFIX_CACHE_FIGURES = {
    "queried_tokens": "prompt tokens looked up in the prefix cache, by tenant",
    "cached_tokens": "prompt tokens found in the prefix cache, by tenant",
    "evicted_blocks": "cached KV blocks evicted, by the tenant that computed them",
}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class LabelCap:
    """The first `max_values` distinct values pass; the rest become "other"."""

    def __init__(self, max_values: int) -> None:
        self.max_values = max_values
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.max_values:
            return OTHER
        self._seen.add(value)
        return value


class _RuntimeCollector(Collector):
    def __init__(self, source: Callable[[], dict[str, dict[str, Any]]],
                 tenant_cap: Callable[[str], str]) -> None:
        self.source = source
        self.tenant_cap = tenant_cap

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        hits = GaugeMetricFamily("loragate_runtime_adapter_hits",
                                 "adapter cache hits by tier, as the runtime reports them",
                                 labels=["runtime", "tier"])
        resident = GaugeMetricFamily("loragate_runtime_adapters_resident",
                                     "adapters resident per cache tier",
                                     labels=["runtime", "tier"])
        loads = GaugeMetricFamily("loragate_runtime_adapter_loads",
                                  "adapter loads since the runtime started", labels=["runtime"])
        evictions = GaugeMetricFamily("loragate_runtime_adapter_evictions",
                                      "adapter evictions by tier since the runtime started",
                                      labels=["runtime", "tier"])
        running = GaugeMetricFamily("loragate_runtime_requests_running",
                                    "requests in the runtime's batch", labels=["runtime"])
        # The autoscaling signals (README "Autoscaling"): queue, KV cache, slots, queue wait.
        waiting = GaugeMetricFamily("loragate_runtime_requests_waiting",
                                    "requests queued in the runtime, not yet in its batch",
                                    labels=["runtime"])
        kv_usage = GaugeMetricFamily("loragate_runtime_kv_cache_usage",
                                     "share of the runtime's KV cache blocks in use (0..1)",
                                     labels=["runtime"])
        slots_held = GaugeMetricFamily("loragate_runtime_adapter_slots_held",
                                       "device adapter slots held by running requests",
                                       labels=["runtime"])
        slots_total = GaugeMetricFamily("loragate_runtime_adapter_slots",
                                        "device adapter slots of the runtime", labels=["runtime"])
        queue_wait = HistogramMetricFamily("loragate_runtime_queue_wait_seconds",
                                           "time from a request's arrival in the runtime to "
                                           "its first step", labels=["runtime"])
        prefix = {name: GaugeMetricFamily(f"loragate_runtime_prefix_cache_{name}", help_text,
                                          labels=["runtime", "tenant"])
                  for name, help_text in PREFIX_CACHE_FIGURES.items()}
        prefix_blocks = GaugeMetricFamily("loragate_runtime_prefix_cache_blocks",
                                          "KV blocks the runtime's prefix cache holds",
                                          labels=["runtime"])
        for url, stats in self.source().items():
            self._prefix_cache(url, stats.get("prefix_cache"), prefix, prefix_blocks)
            adapters = stats.get("adapters") or {}
            for family, value in ((hits, adapters.get("hits")),
                                  (resident, adapters.get("resident")),
                                  (evictions, adapters.get("evictions"))):
                for tier, number in _by_tier(value):
                    family.add_metric([url, tier], number)
            for _tier, number in _by_tier(adapters.get("loads")):
                loads.add_metric([url], number)
            for _tier, number in _by_tier(stats.get("num_running")):
                running.add_metric([url], number)
            for _tier, number in _by_tier(stats.get("num_waiting")):
                waiting.add_metric([url], number)
            free, total = stats.get("kv_blocks_free"), stats.get("kv_blocks_total")
            if isinstance(free, int) and isinstance(total, int) and total > 0:
                kv_usage.add_metric([url], 1.0 - free / total)
            slots = adapters.get("slots") or {}
            if _is_number(slots.get("held")) and _is_number(slots.get("total")):
                slots_held.add_metric([url], slots["held"])
                slots_total.add_metric([url], slots["total"])
            histogram = _histogram(stats.get("queue_wait_seconds"))
            if histogram is not None:
                queue_wait.add_metric([url], *histogram)
        yield from (hits, resident, loads, evictions, running, waiting, kv_usage, slots_held,
                    slots_total, queue_wait)
        yield prefix_blocks
        yield from prefix.values()

    def _prefix_cache(self, url: str, figures: Any, prefix: dict[str, GaugeMetricFamily],
                      blocks: GaugeMetricFamily) -> None:
        """A runtime's /stats "prefix_cache": per tenant, summed under "other" past the cap."""
        if not isinstance(figures, dict):
            return
        if _is_number(figures.get("cached_blocks")):
            blocks.add_metric([url], figures["cached_blocks"])
        tenants = figures.get("tenants")
        if not isinstance(tenants, dict):
            return
        summed: dict[tuple[str, str], float] = {}
        for tenant, counts in tenants.items():
            if not isinstance(counts, dict):
                continue
            label = self.tenant_cap(str(tenant))
            for name in PREFIX_CACHE_FIGURES:
                if _is_number(counts.get(name)):
                    summed[name, label] = summed.get((name, label), 0.0) + counts[name]
        for (name, label), value in summed.items():
            prefix[name].add_metric([url, label], value)


class _LoadCollector(Collector):
    """The router's in-flight counts against their caps, and the requests it shed."""

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self.source = source

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        figures = self.source()
        shed = CounterMetricFamily("loragate_requests_shed",
                                   "requests answered 503 because no runtime could take them",
                                   labels=["reason"])
        for reason, count in figures.get("shed", {}).items():
            shed.add_metric([reason], count)
        in_flight = GaugeMetricFamily("loragate_runtime_in_flight",
                                      "requests this gateway has in flight on the runtime",
                                      labels=["runtime"])
        limit = GaugeMetricFamily("loragate_runtime_in_flight_limit",
                                  "in-flight requests past which the gateway sheds",
                                  labels=["runtime"])
        for url, load in figures.get("runtimes", {}).items():
            in_flight.add_metric([url], load["in_flight"])
            limit.add_metric([url], load["limit"])
        # Membership as this gateway sees it: a fleet whose ready count lags its pod count is
        # one whose DNS answers or readiness lag.
        members = GaugeMetricFamily("loragate_runtimes",
                                    "runtimes this gateway knows, by state (draining: gone "
                                    "from discovery with requests still in flight)",
                                    labels=["state"])
        for state, count in figures.get("members", {}).items():
            members.add_metric([state], count)
        dns_failures = CounterMetricFamily("loragate_dns_failures",
                                           "DNS resolutions of dns+ runtimes that failed and "
                                           "kept the last answer")
        dns_failures.add_metric([], figures.get("dns_failures", 0))
        yield from (shed, in_flight, limit, members, dns_failures)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _histogram(value: Any) -> tuple[list[tuple[str, float]], float] | None:
    """(cumulative buckets, sum) of a runtime's {"buckets": {le: n}, "sum": s}, else None."""
    if not isinstance(value, dict) or not isinstance(value.get("buckets"), dict):
        return None
    buckets = [(str(le), float(n)) for le, n in value["buckets"].items() if _is_number(n)]
    if not buckets or buckets[-1][0] != "+Inf" or not _is_number(value.get("sum")):
        return None
    return buckets, float(value["sum"])


class _RolloutCollector(Collector):
    """Stage and weight of each running rollout, as of this replica's last decision round:
    one series per running rollout, gone once it ends (bounded by the running rollouts)."""

    def __init__(self) -> None:
        self.running: dict[tuple[str, str], tuple[int, float]] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stage = GaugeMetricFamily("loragate_rollout_stage",
                                  "index of the running rollout's stage (0-based)",
                                  labels=["tenant", "adapter"])
        weight = GaugeMetricFamily("loragate_rollout_weight",
                                   "percent of users on the rollout's candidate",
                                   labels=["tenant", "adapter"])
        for (tenant, adapter), (index, percent) in self.running.items():
            stage.add_metric([tenant, adapter], index)
            weight.add_metric([tenant, adapter], percent)
        yield from (stage, weight)


def _by_tier(value: Any) -> list[tuple[str, float]]:
    """A runtime figure given per tier ({"device": 3, ...}) or as one number ("all")."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [("all", float(value))]
    if isinstance(value, dict):
        return [(str(k), float(v)) for k, v in value.items()
                if isinstance(v, int | float) and not isinstance(v, bool)]
    return []


class Metrics:
    def __init__(
        self,
        runtime_stats: Callable[[], dict[str, dict[str, Any]]] | None = None,
        router_load: Callable[[], dict[str, Any]] | None = None,
        *,
        max_values: int = 200,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._caps = {name: LabelCap(max_values) for name in LABELS}
        self.requests = Counter("loragate_requests", "inference requests by HTTP status",
                                [*LABELS, "status"], registry=self.registry)
        self.ttft = Histogram("loragate_time_to_first_token_seconds",
                              "time from request to the first token", LABELS,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("loragate_request_latency_seconds",
                                 "time from request to the last byte", LABELS,
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens_in = Counter("loragate_tokens_in", "prompt tokens", LABELS,
                                 registry=self.registry)
        # Hit rate by tenant: tokens_in_cached / tokens_in (prefix cache, API.md).
        self.tokens_in_cached = Counter("loragate_tokens_in_cached",
                                        "prompt tokens whose K/V came from the prefix cache",
                                        LABELS, registry=self.registry)
        self.tokens_out = Counter("loragate_tokens_out", "generated tokens", LABELS,
                                  registry=self.registry)
        self.feedback = Counter("loragate_feedback", "feedback scores received",
                                LABELS, registry=self.registry)
        self.feedback_score = Counter("loragate_feedback_score",
                                      "sum of the feedback scores received", LABELS,
                                      registry=self.registry)
        # Only the replica whose decision applied counts it: the sum over replicas is exact.
        self.rollbacks = Counter("loragate_rollout_rollbacks", "rollouts rolled back",
                                 ["tenant", "adapter"], registry=self.registry)
        self._rollouts = _RolloutCollector()
        self.registry.register(self._rollouts)
        if runtime_stats is not None:
            self.registry.register(_RuntimeCollector(runtime_stats, self._caps["tenant"]))
        if router_load is not None:
            self.registry.register(_LoadCollector(router_load))

    def labels(self, tenant: str, adapter: str, variant: str) -> tuple[str, str, str]:
        return (self._caps["tenant"](tenant), self._caps["adapter"](adapter),
                self._caps["variant"](variant))

    def observe(
        self, labels: tuple[str, str, str], *, status: int, ttft_s: float | None,
        total_s: float, tokens_in: int, tokens_out: int, tokens_cached: int = 0,
    ) -> None:
        self.requests.labels(*labels, str(status)).inc()
        if ttft_s is not None:
            self.ttft.labels(*labels).observe(ttft_s)
        self.latency.labels(*labels).observe(total_s)
        if tokens_in:
            self.tokens_in.labels(*labels).inc(tokens_in)
        if tokens_out:
            self.tokens_out.labels(*labels).inc(tokens_out)
        if tokens_cached:
            self.tokens_in_cached.labels(*labels).inc(tokens_cached)

    def observe_feedback(self, labels: tuple[str, str, str], score: float) -> None:
        self.feedback.labels(*labels).inc()
        self.feedback_score.labels(*labels).inc(score)

    def rollout_rolled_back(self, tenant: str, adapter: str) -> None:
        self.rollbacks.labels(self._caps["tenant"](tenant), self._caps["adapter"](adapter)).inc()

    def rollouts_now(self, views: Sequence[RolloutView]) -> None:
        """The running rollouts as of a decision round (ended ones drop out)."""
        self._rollouts.running = {(v.tenant, v.adapter): (v.stage, float(v.weight))
                                  for v in views if v.state == "running"}

    def render(self) -> bytes:
        return generate_latest(self.registry)
