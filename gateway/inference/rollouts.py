"""Rollouts in the gateway: sticky arms, per-arm figures per stage, and the decision loop.

Assignment: `bucket = sha256("rollout:<id>:<user>") mod 10_000` (experiments.py's hash), and
`ResolvedRollout.arm(bucket)` gives the candidate the lowest buckets, so a user on the
candidate stays there as the stage's weight grows. No user: a random bucket.

Figures are kept per (rollout id, stage, arm): requests, errors, the latencies of the last
`LATENCY_WINDOW` successful answers, and the feedback scores (feedback.py's ScoreBook under
the same key). With Redis every replica writes and reads the same keys, so each replica's
decision loop judges all the traffic; each answer is recorded in one Redis pipeline from the
book-keeping task, after the answer is out, so a read by the loop sees every answer booked
before it. Without Redis (one replica) they live in process.

The decision loop (`RolloutController.tick`, every `tick_s` on every replica): for each running
rollout of any tenant, read both arms of its current stage (a 100% stage has no stable
traffic, so its baseline is the stable arm of the stage before); once `guardrails.stage_due`,
`guardrails.evaluate` them and hand the verdict to `Catalog.decide_rollout`, whose conditional
UPDATE lets exactly one replica apply it (see adapters/rollouts.py for why that and not a
Redis lease). Only the replica that got the decision back counts a rollback, so the
Prometheus counter summed over replicas is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from adapters.guardrails import ArmFigures, evaluate, stage_due
from gateway.inference.experiments import NUM_BUCKETS, bucket_of
from gateway.inference.feedback import ScoreBook, Scores, rollout_key

if TYPE_CHECKING:
    from adapters.views import ResolvedRollout, RolloutView
    from gateway.inference.metrics import Metrics

logger = logging.getLogger("loragate.gateway.rollouts")
ARMS = ("stable", "candidate")
LATENCY_WINDOW = 1000
_PREFIX = "loragate:ro:"


def assign(rollout: ResolvedRollout, user: str | None, rng: random.Random | None = None) -> str:
    """The user's arm: "stable" or "candidate"."""
    if user:
        bucket = bucket_of(rollout.hash_seed, user)
    else:
        bucket = (rng or random).randrange(NUM_BUCKETS)
    return rollout.arm(bucket)


def _p95(latencies: list[float]) -> float | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    return round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3)


def arm_figures(requests: int, errors: int, latencies: list[float], scores: Scores) -> ArmFigures:
    return ArmFigures(requests=requests, errors=errors, p95_latency_ms=_p95(latencies),
                      feedback_count=scores.count, feedback_mean=scores.mean)


def figures_dict(arm: ArmFigures, scores: Scores) -> dict[str, Any]:
    """One arm as GET rollout shows it."""
    return {"requests": arm.requests, "errors": arm.errors,
            "p95_latency_ms": arm.p95_latency_ms, **scores.figures()}


class RolloutStats:
    """Per (rollout, stage, arm): requests, errors, latencies; scores from the ScoreBook."""

    def __init__(self, redis: Any = None, scores: ScoreBook | None = None) -> None:
        self.redis = redis
        self.scores = scores if scores is not None else ScoreBook(redis)
        self._local: dict[str, tuple[list[int], deque[float]]] = {}

    async def record(self, rollout_id: int, stage: int, arm: str, *, ok: bool,
                     latency_s: float) -> None:
        key = rollout_key(rollout_id, stage, arm)
        if self.redis is None:
            counters, latencies = self._local.setdefault(
                key, ([0, 0], deque(maxlen=LATENCY_WINDOW)))
            counters[0] += 1
            counters[1] += 0 if ok else 1
            if ok:
                latencies.append(latency_s * 1000.0)
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(_PREFIX + key, "requests", 1)
                if not ok:
                    pipe.hincrby(_PREFIX + key, "errors", 1)
                else:
                    pipe.lpush(_PREFIX + key + ":lat", f"{latency_s * 1000.0:.3f}")
                    pipe.ltrim(_PREFIX + key + ":lat", 0, LATENCY_WINDOW - 1)
                await pipe.execute()
        except Exception as exc:  # figures are best effort; the answer already went out
            logger.warning("rollout figures not recorded: %s", type(exc).__name__)

    async def arms(self, rollout_id: int, stage: int) -> dict[str, tuple[ArmFigures, Scores]]:
        """Both arms of one stage: the guardrails' figures and the raw score sums."""
        keys = {arm: rollout_key(rollout_id, stage, arm) for arm in ARMS}
        scores = await self.scores.read(keys.values())
        out = {}
        for arm, key in keys.items():
            requests, errors, latencies = await self._counts(key)
            arm_scores = scores.get(key, Scores())
            out[arm] = (arm_figures(requests, errors, latencies, arm_scores), arm_scores)
        return out

    async def _counts(self, key: str) -> tuple[int, int, list[float]]:
        if self.redis is None:
            row = self._local.get(key)
            if row is None:
                return 0, 0, []
            return row[0][0], row[0][1], list(row[1])
        raw = await self.redis.hgetall(_PREFIX + key)
        fields = {k.decode(): int(v) for k, v in raw.items()}
        latencies = [float(x) for x in await self.redis.lrange(_PREFIX + key + ":lat", 0, -1)]
        return fields.get("requests", 0), fields.get("errors", 0), latencies


class RolloutController:
    """The decision loop of one replica; `tick` is one round (tests call it directly)."""

    def __init__(self, catalog: Any, stats: RolloutStats, metrics: Metrics, *,
                 tick_s: float = 1.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.catalog = catalog
        self.stats = stats
        self.metrics = metrics
        self.tick_s = tick_s
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def tick(self, now: datetime | None = None) -> list[RolloutView]:
        """One round over every running rollout; the decisions this replica applied."""
        now = now if now is not None else self._clock()
        running = await self.catalog.running_rollouts()
        decided: list[RolloutView] = []
        for view in running:
            stable, candidate = await self.judged(view)
            if not stage_due(view, now, stable, candidate):
                continue
            verdict = evaluate(view.guardrails, stable, candidate)
            after = await self.catalog.decide_rollout(view.id, view.stage, verdict)
            if after is None:  # another replica decided this stage first
                continue
            decided.append(after)
            if after.state == "rolled_back":
                self.metrics.rollout_rolled_back(after.tenant, after.adapter)
                logger.warning("rollout of %s/%s@%d rolled back: %s", after.tenant,
                               after.adapter, after.version, verdict.reason)
        decided_ids = {d.id: d for d in decided}
        self.metrics.rollouts_now([decided_ids.get(v.id, v) for v in running])
        return decided

    async def judged(self, view: RolloutView) -> tuple[ArmFigures, ArmFigures]:
        """The (stable, candidate) figures the guardrails judge the current stage on.

        A stage at 100% sends no user to the stable arm, so it could never reach
        min_requests there; its baseline is the stable arm of the stage before, which passed
        with min_requests. A rollout whose only stage is 100% has no stable traffic at all:
        only the candidate's own figures count (its error rate against none)."""
        arms = await self.stats.arms(view.id, view.stage)
        stable, candidate = arms["stable"][0], arms["candidate"][0]
        if view.weight >= 100:
            if view.stage > 0:
                stable = (await self.stats.arms(view.id, view.stage - 1))["stable"][0]
            else:
                stable = ArmFigures(requests=view.min_requests)
        return stable, candidate

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the catalog or Redis may be away; try again next round
                logger.warning("rollout decision round failed", exc_info=True)
            await asyncio.sleep(self.tick_s)


async def rollout_figures(stats: RolloutStats, view: RolloutView) -> dict[str, Any]:
    """GET rollout's figures: both arms of the current stage and of every stage reached."""
    stages = []
    for stage in range(view.stage + 1):
        arms = await stats.arms(view.id, stage)
        stages.append({"stage": stage, "weight": view.stages[stage],
                       **{arm: figures_dict(*arms[arm]) for arm in ARMS}})
    current = stages[-1]
    return {"stable": current["stable"], "candidate": current["candidate"],
            "stage_figures": stages}
