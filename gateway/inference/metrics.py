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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from adapters.views import RolloutView

OTHER = "other"
LABELS = ("tenant", "adapter", "variant")
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
    def __init__(self, source: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
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
        for url, stats in self.source().items():
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
        yield from (hits, resident, loads, evictions, running)


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
        yield from (shed, in_flight, limit)


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
            self.registry.register(_RuntimeCollector(runtime_stats))
        if router_load is not None:
            self.registry.register(_LoadCollector(router_load))

    def labels(self, tenant: str, adapter: str, variant: str) -> tuple[str, str, str]:
        return (self._caps["tenant"](tenant), self._caps["adapter"](adapter),
                self._caps["variant"](variant))

    def observe(
        self, labels: tuple[str, str, str], *, status: int, ttft_s: float | None,
        total_s: float, tokens_in: int, tokens_out: int,
    ) -> None:
        self.requests.labels(*labels, str(status)).inc()
        if ttft_s is not None:
            self.ttft.labels(*labels).observe(ttft_s)
        self.latency.labels(*labels).observe(total_s)
        if tokens_in:
            self.tokens_in.labels(*labels).inc(tokens_in)
        if tokens_out:
            self.tokens_out.labels(*labels).inc(tokens_out)

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
