"""A/B assignment: weights held over 5,000 users, sticky users, random without a user."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

import pytest

from adapters.views import ExperimentView, VariantView
from gateway.inference.experiments import SHADOW, ExperimentStats, assign, bucket_of, pick_variant

pytestmark = pytest.mark.unit


def experiment(weights: dict[str, float], exp_id: int = 7) -> ExperimentView:
    variants = tuple(VariantView(name, "a", None, w) for name, w in weights.items())
    return ExperimentView(exp_id, "exp", variants, None, datetime.now(UTC))


def test_5000_users_fall_within_two_points_of_the_weights_and_keep_their_variant() -> None:
    exp = experiment({"control": 70, "candidate": 20, "third": 10})
    users = [f"user-{i}" for i in range(5000)]
    first = {u: assign(exp, u).name for u in users}
    shares = Counter(first.values())
    for name, weight in (("control", 0.7), ("candidate", 0.2), ("third", 0.1)):
        assert abs(shares[name] / len(users) - weight) < 0.02, shares
    assert all(assign(exp, u).name == first[u] for u in users)


def test_moving_weight_moves_only_the_users_in_between() -> None:
    before = experiment({"control": 90, "canary": 10})
    after = experiment({"control": 80, "canary": 20})
    users = [f"u{i}" for i in range(2000)]
    for user in users:
        if assign(before, user).name == "canary":
            assert assign(after, user).name == "canary"


def test_buckets_depend_on_the_experiment_and_cover_the_range() -> None:
    seen = {bucket_of(1, f"u{i}") for i in range(20000)}
    assert min(seen) >= 0 and max(seen) < 10_000 and len(seen) > 8000
    differs = sum(bucket_of(1, f"u{i}") != bucket_of(2, f"u{i}") for i in range(100))
    assert differs > 90


def test_no_user_is_random_but_follows_the_weights() -> None:
    exp = experiment({"a": 50, "b": 50})
    rng = random.Random(3)
    picks = Counter(assign(exp, None, rng).name for _ in range(2000))
    assert 0.45 < picks["a"] / 2000 < 0.55


def test_pick_variant_edges() -> None:
    variants = experiment({"a": 1, "b": 0, "c": 1}).variants
    assert pick_variant(variants, 0).name == "a"
    assert pick_variant(variants, 9_999).name == "c"
    assert all(pick_variant(variants, b).name != "b" for b in range(10_000))


async def test_figures_in_process() -> None:
    stats = ExperimentStats()
    for ms in range(1, 101):
        await stats.record("t", "exp", "a", ok=True, latency_s=ms / 1000, tokens_in=2,
                           tokens_out=3)
    await stats.record("t", "exp", "a", ok=False, latency_s=1.0, tokens_in=2, tokens_out=0)
    await stats.record("t", "exp", SHADOW, ok=True, latency_s=0.01, tokens_in=1, tokens_out=1,
                       identical=True)
    await stats.record("t", "exp", SHADOW, ok=True, latency_s=0.01, tokens_in=1, tokens_out=1,
                       identical=False)
    figures = await stats.figures("t", "exp")
    a = figures["a"]
    assert (a["requests"], a["errors"], a["tokens_in"], a["tokens_out"]) == (101, 1, 202, 300)
    assert 49 <= a["p50_latency_ms"] <= 52 and 94 <= a["p95_latency_ms"] <= 97
    assert figures[SHADOW]["identical_share"] == 0.5
    assert await stats.figures("t", "other") == {}


@pytest.mark.integration
async def test_figures_in_redis_are_shared(redis_url: str) -> None:
    import redis.asyncio as aioredis

    one, two = aioredis.from_url(redis_url), aioredis.from_url(redis_url)
    try:
        await one.flushdb()
        a, b = ExperimentStats(one), ExperimentStats(two)
        await a.record("t", "exp", "v", ok=True, latency_s=0.002, tokens_in=1, tokens_out=1)
        await b.record("t", "exp", "v", ok=False, latency_s=0.5, tokens_in=1, tokens_out=0)
        assert await one.exists("loragate:exp:t:exp:v") == 0  # summed here until a flush
        await b.flush()  # what b's flush loop does every 0.5 s; a flushes when read
        for stats in (a, b):
            figures = (await stats.figures("t", "exp"))["v"]
            assert (figures["requests"], figures["errors"], figures["tokens"]) == (2, 1, 3)
            assert figures["p50_latency_ms"] == 2.0
    finally:
        await one.aclose()
        await two.aclose()
