"""The simulated fleet of bench/fleet_sim.py (a helper, not a benchmark: hence the "_",
which `loragate bench` leaves out): runtimes in simulated time, placed by the
gateway's own router.

The placement is the real code: `gateway.inference.router.Router.candidates` (rendezvous
hashing of the adapter key with bounded load, or least loaded for no key) and
`Router.under_cap` (the in-flight cap past which the gateway sheds), on `RuntimeState`s whose
`in_flight` the simulation moves exactly as `Router.generate` does (+1 when a runtime is
chosen, -1 when its answer ends); membership changes go through `Router.set_members`, so a
runtime that leaves drains as it does in the gateway. Round robin is the one policy the
router does not have: a cycle over the same members, with the same cap.

Each simulated runtime is the runtime's scheduling model, in simulated time (nothing sleeps):
at most `max_running` requests in the batch, one token each per step, a step taking
`step_s(batch)`; an adapter must be in one of `slots` device slots (LRU among the ones no
running request holds) before its request is admitted; behind them a host tier of
`host_slots` (LRU); a miss in both is a cold load from the store, `load_workers` at a time
(runtime/lora/store.py's pool). Loads overlap decoding, as the engine's prefetch does; a
request whose adapter is loading lets others pass.

Where the numbers come from (printed and written with the results):
- step time of a full batch: bench/results/multi_lora.json, engine "zipf-512" (64 requests in
  flight over 512 Zipf adapters, builtin model, CPU): concurrency / tokens_per_s;
- step time of a batch of one: bench/results/engine.json, "ours" at concurrency 1, itl_p50;
  steps in between are interpolated linearly in the batch size;
- cold load: the same multi_lora run's load_seconds (sum / count: fetch, sha256 check, parse,
  install);
- slots, host tier, tokens per request, Zipf exponent: that run's config;
- host tier -> slot: not measured (the runtime times only loads from disk or store): 1 ms
  assumed, `--host-load-s`.
One gateway replica is simulated; with several, each bounds the load it sends by its own
in-flight counts.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.inference.router import Router, RuntimeState

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
POLICIES = ("rendezvous", "least_loaded", "round_robin")
TIERS = ("device", "loading", "host", "store")  # where a request found its adapter


@dataclass(frozen=True)
class Costs:
    step_one_s: float
    step_full_s: float
    cold_load_s: float
    host_load_s: float
    max_running: int
    slots: int
    host_slots: int
    max_tokens: int
    zipf_s: float
    load_workers: int = 4
    sources: dict[str, str] = field(default_factory=dict)

    def step_s(self, batch: int) -> float:
        frac = (batch - 1) / max(self.max_running - 1, 1)
        return self.step_one_s + (self.step_full_s - self.step_one_s) * frac

    @property
    def runtime_rps(self) -> float:
        """Requests per second one runtime finishes with its batch full."""
        return self.max_running / (self.max_tokens * self.step_full_s)


def measured_costs(results: Path, host_load_s: float) -> Costs:
    ml = json.loads((results / "multi_lora.json").read_text())
    cfg, zipf = ml["config"], ml["engine"]["zipf-512"]
    loads = zipf["adapters"]["load_seconds"]
    engine = json.loads((results / "engine.json").read_text())["results"]
    one = next(r for r in engine if r["mode"] == "ours" and r["concurrency"] == 1)
    return Costs(
        step_one_s=one["itl_p50_ms"] / 1000,
        step_full_s=cfg["concurrency"] / zipf["tokens_per_s"],
        cold_load_s=loads["sum"] / loads["count"],
        host_load_s=host_load_s,
        max_running=cfg["concurrency"],
        slots=cfg["gpu_slots"],
        host_slots=cfg["host_slots"],
        max_tokens=cfg["max_tokens"],
        zipf_s=cfg["zipf_s"],
        sources={
            "step_full_s": "multi_lora.json engine.zipf-512: concurrency / tokens_per_s",
            "step_one_s": "engine.json results[mode=ours, concurrency=1].itl_p50_ms",
            "cold_load_s": "multi_lora.json engine.zipf-512.adapters.load_seconds sum/count",
            "host_load_s": "assumed (not measured)",
            "max_running, slots, host_slots, max_tokens, zipf_s":
                "multi_lora.json config: concurrency, gpu_slots, host_slots, max_tokens, zipf_s",
        },
    )


class Req:
    __slots__ = ("arrival", "key", "state", "runtime", "admitted")

    def __init__(self, arrival: float, key: str) -> None:
        self.arrival, self.key = arrival, key
        self.state: RuntimeState | None = None
        self.runtime: SimRuntime | None = None
        self.admitted = 0.0


class SimRuntime:
    """One runtime's batch, slots and tiers, advanced by the Fleet's event loop."""

    def __init__(self, fleet: Fleet, url: str) -> None:
        self.fleet, self.url, self.costs = fleet, url, fleet.costs
        self.device: OrderedDict[str, None] = OrderedDict()  # LRU, most recent last
        self.pins: dict[str, int] = {}
        self.host: OrderedDict[str, None] = OrderedDict()
        self.loading: set[str] = set()
        self.ready: set[str] = set()  # loaded, waiting for a free slot
        self.load_queue: deque[tuple[str, float]] = deque()
        self.num_loaders = 0
        self.waiting: deque[Req] = deque()
        self.num_running = 0
        self.step_no = 0
        self.ending: dict[int, list[Req]] = {}
        self.busy = False

    # -- adapters
    def arrive(self, req: Req, now: float) -> str:
        key = req.key
        if key in self.device:
            tier = "device"
        elif key in self.loading or key in self.ready:
            tier = "loading"
        elif key in self.host:
            tier = "host"
            self.host.move_to_end(key)
            self._load(key, self.costs.host_load_s, now)
        else:
            tier = "store"
            self.fleet.count_cold_load(now)
            self._load(key, self.costs.cold_load_s, now)
        self.waiting.append(req)
        self.kick(now)
        return tier

    def _load(self, key: str, seconds: float, now: float) -> None:
        self.loading.add(key)
        self.load_queue.append((key, seconds))
        self._start_loads(now)

    def _start_loads(self, now: float) -> None:
        while self.load_queue and self.num_loaders < self.costs.load_workers:
            key, seconds = self.load_queue.popleft()
            self.num_loaders += 1
            self.fleet.at(now + seconds, self.loaded, key)

    def loaded(self, now: float, key: str) -> None:
        self.num_loaders -= 1
        self.loading.discard(key)
        self.host[key] = None
        self.host.move_to_end(key)
        while len(self.host) > self.costs.host_slots:
            self.host.popitem(last=False)
        self.ready.add(key)
        self._place_ready()
        self._start_loads(now)
        self.kick(now)

    def _place_ready(self) -> None:
        for key in list(self.ready):
            if len(self.device) >= self.costs.slots:
                victim = next((k for k in self.device if not self.pins.get(k)), None)
                if victim is None:
                    return  # every slot is held by a running request
                del self.device[victim]
            self.device[key] = None
            self.ready.discard(key)

    # -- batch
    def kick(self, now: float) -> None:
        if not self.busy:
            self._admit(now)
            if self.num_running:
                self.busy = True
                self.fleet.at(now + self.costs.step_s(self.num_running), self.stepped)

    def _admit(self, now: float) -> None:
        if not self.waiting or self.num_running >= self.costs.max_running:
            return
        passed: deque[Req] = deque()
        while self.waiting and self.num_running < self.costs.max_running:
            req = self.waiting.popleft()
            if req.key not in self.device:
                passed.append(req)  # its adapter is loading: others pass
                continue
            self.device.move_to_end(req.key)
            self.pins[req.key] = self.pins.get(req.key, 0) + 1
            self.num_running += 1
            req.admitted = now
            self.ending.setdefault(self.step_no + self.costs.max_tokens, []).append(req)
            self.fleet.admitted(req)
        passed.extend(self.waiting)
        self.waiting = passed

    def stepped(self, now: float) -> None:
        self.step_no += 1
        for req in self.ending.pop(self.step_no, ()):
            self.num_running -= 1
            self.pins[req.key] -= 1
            if not self.pins[req.key]:
                del self.pins[req.key]
            self.fleet.finished(req, now)
        self._place_ready()
        self.busy = False
        self.kick(now)


class Fleet:
    def __init__(self, costs: Costs, num_runtimes: int, policy: str, warmup_s: float,
                 load_factor: float) -> None:
        self.costs, self.policy, self.warmup_s = costs, policy, warmup_s
        self.duration_s = float("inf")  # set by simulate()
        self.events: list[tuple[float, int, Any, tuple[Any, ...]]] = []
        self.seq = itertools.count()
        self.router = Router(None, (), client=_NoClient(), load_factor=load_factor)  # type: ignore[arg-type]
        self.sims: dict[str, SimRuntime] = {}
        self.next_id = itertools.count()
        self._rr = 0
        self.tiers = dict.fromkeys(TIERS, 0)
        self.cold_loads = 0
        self.cold_load_times: list[float] = []
        self.delays: list[float] = []
        self.imbalance: list[float] = []
        self.shed = 0
        self.completed = 0
        self.seen: set[str] = set()
        self.first_touch = 0  # requests for an adapter no runtime had been asked for yet
        self.set_size(num_runtimes)

    # -- membership (through the router's own set_members: leavers drain)
    def new_url(self) -> str:
        n = next(self.next_id)
        return f"http://10.{n // 65536}.{n // 256 % 256}.{n % 256}:8100"

    def set_size(self, size: int, leave: int = 0) -> None:
        urls = list(self.router.runtimes)
        urls = urls[leave:]
        while len(urls) < size:
            urls.append(self.new_url())
        self.router.set_members(set(urls))
        for url, state in self.router.runtimes.items():
            if url not in self.sims:
                state.healthy = True
                state.stats = {"limits": {"max_running": self.costs.max_running}}
                self.sims[url] = SimRuntime(self, url)

    # -- events
    def at(self, t: float, fn: Any, *args: Any) -> None:
        heapq.heappush(self.events, (t, next(self.seq), fn, args))

    def run_until(self, t_end: float) -> None:
        while self.events and self.events[0][0] <= t_end:
            t, _, fn, args = heapq.heappop(self.events)
            self.now = t
            fn(t, *args)

    def measuring(self, now: float) -> bool:
        return now >= self.warmup_s

    def count_cold_load(self, now: float) -> None:
        self.cold_load_times.append(now)
        if self.measuring(now):
            self.cold_loads += 1

    def choose(self, key: str) -> RuntimeState | None:
        router = self.router
        if self.policy == "rendezvous":
            ordered = router.candidates(key)
        elif self.policy == "least_loaded":
            ordered = router.candidates(None)
        else:
            members = list(router.runtimes.values())
            self._rr = (self._rr + 1) % len(members)
            ordered = members[self._rr:] + members[:self._rr]
        placed = router.under_cap(ordered)
        return placed[0] if placed else None

    def arrival(self, now: float, key: str) -> None:
        req = Req(now, key)
        state = self.choose(key)
        measuring = self.measuring(now)
        if state is None:
            if measuring:
                self.shed += 1
            return
        state.in_flight += 1  # as Router.generate: held from the choice to the answer's end
        req.state, req.runtime = state, self.sims[state.url]
        tier = req.runtime.arrive(req, now)
        if measuring:
            self.tiers[tier] += 1
            if key not in self.seen:
                self.first_touch += 1
        self.seen.add(key)

    def admitted(self, req: Req) -> None:
        if self.measuring(req.arrival):
            self.delays.append(req.admitted - req.arrival)

    def finished(self, req: Req, now: float) -> None:
        assert req.state is not None
        req.state.in_flight -= 1
        if self.measuring(req.arrival):
            self.completed += 1

    def sample(self, now: float, every: float) -> None:
        loads = [s.in_flight for s in self.router.runtimes.values()]
        mean = sum(loads) / len(loads) if loads else 0.0
        # Only while requests arrive: the last few draining at the end say nothing of balance.
        if self.warmup_s <= now <= self.duration_s and mean > 0:
            self.imbalance.append(max(loads) / mean)
        self.at(now + every, self.sample, every)


class _NoClient:
    """The router's /generate client: the simulation never sends a request."""

    async def aclose(self) -> None:
        pass
