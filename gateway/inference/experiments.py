"""A/B assignment and the per-variant figures of experiments.

Assignment: `bucket = sha256("<experiment id>:<user>") mod 10_000`; the buckets are laid over
the variants by cumulative weight, so a user keeps its variant while the weights stay the
same, and moving weight from one variant to another only moves the users in between. With no
user the bucket is drawn at random. A canary is an experiment whose candidate has a small
weight; promotion and rollback are `activate` on the adapter.

Figures per variant: requests, errors, p50/p95 latency (over the last `LATENCY_WINDOW`
answers), tokens in and out; for the shadow, also how many of its outputs were identical to
the primary's (whether a copy is sent at all is shadow.py's). They live in Redis when
configured (shared by every gateway), else here, under `stats_key(experiment)`: the
experiment's id, not its name, so an experiment deleted and created again under the same
name starts from zero (and `forget` drops a deleted one's figures, since a database may hand
a deleted row's id out again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from adapters.views import ExperimentView, VariantView

logger = logging.getLogger("loragate.gateway.experiments")
NUM_BUCKETS = 10_000
LATENCY_WINDOW = 1000
SHADOW = ":shadow"  # a key no variant can have (names never hold ':')
_PREFIX = "loragate:exp:"
_COUNTERS = ("requests", "errors", "tokens_in", "tokens_out", "compared", "identical")


def bucket_of(experiment_id: int | str, user: str) -> int:
    digest = hashlib.sha256(f"{experiment_id}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % NUM_BUCKETS


def stats_key(experiment: ExperimentView) -> str:
    """The figures' key of an experiment: its id (see the module's docstring)."""
    return str(experiment.id)


def pick_variant(
    variants: Sequence[VariantView], bucket: int
) -> VariantView:
    """The variant whose cumulative-weight interval holds the bucket's midpoint.

    Weights are taken relative to the largest, so each is at most 1 and their sum cannot
    overflow (1e308 + 1e308 is inf, and every point would fall past the last variant)."""
    largest = max(min(v.weight, sys.float_info.max) for v in variants)
    if not largest > 0:
        return variants[0]
    weights = [min(v.weight, sys.float_info.max) / largest for v in variants]
    point = (bucket + 0.5) / NUM_BUCKETS * sum(weights)
    running = 0.0
    for variant, weight in zip(variants, weights, strict=True):
        running += weight
        if point < running:
            return variant
    return variants[-1]


def assign(
    experiment: ExperimentView, user: str | None, rng: random.Random | None = None
) -> VariantView:
    if user:
        bucket = bucket_of(experiment.id, user)
    else:
        bucket = (rng or random).randrange(NUM_BUCKETS)
    return pick_variant(experiment.variants, bucket)


@dataclass(slots=True)
class _Local:
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def _figures(counters: dict[str, int], latencies: Sequence[float]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "requests": counters["requests"],
        "errors": counters["errors"],
        "p50_latency_ms": _percentile(latencies, 0.50),
        "p95_latency_ms": _percentile(latencies, 0.95),
        "tokens": counters["tokens_in"] + counters["tokens_out"],
        "tokens_in": counters["tokens_in"],
        "tokens_out": counters["tokens_out"],
    }
    if counters["compared"]:
        out["identical_share"] = round(counters["identical"] / counters["compared"], 4)
    return out


class ExperimentStats:
    """Records answers per (tenant, experiment, variant); `SHADOW` is the shadow's row.

    With Redis, records are summed here and flushed every `flush_s` in one pipeline (and
    before figures are read), so the request path costs no Redis round trip; a gateway that
    dies loses at most its last `flush_s` of figures."""

    def __init__(self, redis: Any = None, *, flush_s: float = 0.5) -> None:
        self.redis = redis
        self.flush_s = flush_s
        self._local: dict[tuple[str, str, str], _Local] = {}
        self._pending: dict[tuple[str, str, str], _Local] = {}
        self._task: asyncio.Task[None] | None = None

    async def record(
        self, tenant: str, experiment: str, variant: str, *, ok: bool, latency_s: float,
        tokens_in: int, tokens_out: int, identical: bool | None = None,
    ) -> None:
        increments = {"requests": 1, "errors": 0 if ok else 1, "tokens_in": tokens_in,
                      "tokens_out": tokens_out}
        if identical is not None:
            increments["compared"] = 1
            increments["identical"] = int(identical)
        rows = self._pending if self.redis is not None else self._local
        row = rows.setdefault((tenant, experiment, variant), _Local())
        for name, amount in increments.items():
            row.counters[name] += amount
        if ok:
            row.latencies_ms.append(latency_s * 1000.0)

    async def flush(self) -> None:
        if self.redis is None or not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (tenant, experiment, variant), row in pending.items():
                    key = f"{_PREFIX}{tenant}:{experiment}:{variant}"
                    for name, amount in row.counters.items():
                        if amount:
                            pipe.hincrby(key, name, amount)
                    if row.latencies_ms:
                        pipe.lpush(key + ":lat", *(f"{x:.3f}" for x in row.latencies_ms))
                        pipe.ltrim(key + ":lat", 0, LATENCY_WINDOW - 1)
                    pipe.sadd(f"{_PREFIX}{tenant}:{experiment}", variant)
                await pipe.execute()
        except Exception as exc:  # figures are best effort; the answers already went out
            logger.warning("experiment figures not recorded: %s", type(exc).__name__)

    async def forget(self, tenant: str, experiment: str) -> None:
        """Drop an experiment's figures (it was deleted), here and in Redis."""
        for rows in (self._local, self._pending):
            for key in [k for k in rows if k[:2] == (tenant, experiment)]:
                del rows[key]
        if self.redis is None:
            return
        base = f"{_PREFIX}{tenant}:{experiment}"
        try:
            variants = [v.decode() for v in await self.redis.smembers(base)]
            keys = [base] + [f"{base}:{v}{lat}" for v in variants for lat in ("", ":lat")]
            await self.redis.delete(*keys)
        except Exception as exc:  # best effort, as recording is: the id is not reused there
            logger.warning("experiment figures not dropped: %s", type(exc).__name__)

    async def start(self) -> None:
        if self.redis is not None:
            self._task = asyncio.create_task(self._flush_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def figures(self, tenant: str, experiment: str) -> dict[str, dict[str, Any]]:
        if self.redis is not None:
            await self.flush()
            try:
                return await self._redis_figures(tenant, experiment)
            except Exception as exc:
                logger.warning("experiment figures unreadable: %s", type(exc).__name__)
        return {
            variant: _figures(local.counters, list(local.latencies_ms))
            for (t, e, variant), local in self._local.items()
            if t == tenant and e == experiment
        }

    async def _redis_figures(self, tenant: str, experiment: str) -> dict[str, dict[str, Any]]:
        base = f"{_PREFIX}{tenant}:{experiment}"
        variants = sorted(v.decode() for v in await self.redis.smembers(base))
        out: dict[str, dict[str, Any]] = {}
        for variant in variants:
            raw = await self.redis.hgetall(f"{base}:{variant}")
            counters = dict.fromkeys(_COUNTERS, 0)
            counters.update({k.decode(): int(v) for k, v in raw.items()})
            latencies = [float(x) for x in await self.redis.lrange(f"{base}:{variant}:lat", 0, -1)]
            out[variant] = _figures(counters, latencies)
        return out
