"""Feedback: the statistics, the bounded answer log (in process and in Redis), and
POST /v1/feedback under isolation, with experiment figures per variant."""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from adapters.errors import NotFound
from gateway.inference.feedback import (
    REDIS_BYTES_PER_ANSWER,
    REDIS_MAX_BYTES_PER_ANSWER,
    AnswerLog,
    Scores,
    Served,
    experiment_key,
    welch_test,
)
from tests.support.delivery import QUIET_LOOP, ask, score, two_versions
from tests.support.gw_helpers import admin, bearer, create_tenant, upload


def scores_of(values: list[float]) -> Scores:
    return Scores(len(values), sum(values), sum(v * v for v in values))


# ------------------------------------------------------------------------------ statistics


@pytest.mark.unit
def test_mean_and_confidence_interval_match_the_textbook() -> None:
    values = [0.1, 0.4, 0.35, 0.8, 0.55, 0.6, 0.9, 0.2]
    s = scores_of(values)
    assert s.mean == pytest.approx(statistics.fmean(values))
    assert s.variance == pytest.approx(statistics.variance(values))
    half = 1.959963984540054 * statistics.stdev(values) / math.sqrt(len(values))
    low, high = s.ci95()  # type: ignore[misc]
    assert (low, high) == (pytest.approx(s.mean - half), pytest.approx(s.mean + half))
    assert Scores().figures() == {"feedback_count": 0, "feedback_mean": None,
                                  "feedback_ci95": None}
    assert scores_of([1.0]).ci95() is None
    assert scores_of([1.0, 1.0, 1.0]).ci95() == (1.0, 1.0)  # clipped to the score range


@pytest.mark.unit
@pytest.mark.parametrize(("t", "df", "p"), [
    # Two-sided Student t tail probabilities from published tables.
    (2.228138851986, 10, 0.05), (1.812461122811, 10, 0.10), (2.042272456301, 30, 0.05),
    (3.169272667176, 10, 0.01), (4.302652729911, 2, 0.05), (0.0, 10, 1.0),
])
def test_welch_p_values_match_student_tables(t: float, df: int, p: float) -> None:
    # Equal sizes and variances: Welch's df is 2n - 2 and t = shift / sqrt(2 s^2 / n).
    n = df // 2 + 1
    a = [0.1 + 0.6 * i / (n - 1) for i in range(n)]
    shift = t * math.sqrt(2 * statistics.variance(a) / n)
    result = welch_test(scores_of([x + shift for x in a]), scores_of(a))
    assert result is not None
    assert result["t"] == pytest.approx(t, abs=1e-5)
    assert result["df"] == pytest.approx(df, abs=1e-3)
    assert result["p_value"] == pytest.approx(p, abs=2e-6)


@pytest.mark.unit
def test_welch_with_unequal_variances_and_edges() -> None:
    rng = random.Random(0)
    a = [min(1, max(0, rng.gauss(0.7, 0.05))) for _ in range(40)]
    b = [min(1, max(0, rng.gauss(0.5, 0.3))) for _ in range(15)]
    result = welch_test(scores_of(a), scores_of(b))
    va, vb = statistics.variance(a) / 40, statistics.variance(b) / 15
    assert result is not None
    assert result["t"] == pytest.approx((statistics.fmean(a) - statistics.fmean(b))
                                        / math.sqrt(va + vb), rel=1e-5)
    assert 0 < result["p_value"] < 1
    assert result["df"] == pytest.approx((va + vb) ** 2 / (va**2 / 39 + vb**2 / 14), rel=1e-3)
    assert welch_test(scores_of([0.5]), scores_of(b)) is None
    same = welch_test(scores_of([0.5, 0.5]), scores_of([0.5, 0.5]))
    assert same is not None and same["p_value"] == 1.0


# ------------------------------------------------------------------------------ answer log


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SERVED = Served("acme", "support", 2, experiment_id=7, variant="b", rollout_id=None)


@pytest.mark.unit
async def test_answer_log_books_once_per_answer_and_is_bounded_in_process() -> None:
    clock = Clock()
    log = AnswerLog(ttl_s=60, max_entries=3, clock=clock)
    await log.remember("cmpl-1", SERVED)
    await log.score("acme", "cmpl-1", 0.2)
    await log.score("acme", "cmpl-1", 0.6)  # replaces: one answer, one score
    key = experiment_key("acme", 7, "b")
    assert (await log.scores.read([key]))[key] == Scores(1, pytest.approx(0.6),
                                                         pytest.approx(0.36))
    with pytest.raises(NotFound):
        await log.score("beta", "cmpl-1", 0.9)  # another tenant's answer
    with pytest.raises(NotFound):
        await log.score("acme", "cmpl-unknown", 0.9)
    assert (await log.scores.read([key]))[key].total == pytest.approx(0.6)
    for i in range(2, 6):
        await log.remember(f"cmpl-{i}", SERVED)
    with pytest.raises(NotFound):  # the oldest went first beyond max_entries
        await log.score("acme", "cmpl-1", 0.9)
    await log.score("acme", "cmpl-5", 1.0)
    clock.now += 61
    with pytest.raises(NotFound):  # past the TTL
        await log.score("acme", "cmpl-4", 1.0)


@pytest.mark.integration
async def test_answer_log_in_redis_is_shared_bounded_and_isolated(redis_url: str) -> None:
    import redis.asyncio as aioredis

    one, two = aioredis.from_url(redis_url), aioredis.from_url(redis_url)
    try:
        a = AnswerLog(one, ttl_s=120, max_entries=1)
        b = AnswerLog(two, ttl_s=120, max_entries=1)
        await a.remember("chatcmpl-" + "0" * 32, SERVED)
        with pytest.raises(NotFound):
            await b.score("beta", "chatcmpl-" + "0" * 32, 0.5)
        await b.score("acme", "chatcmpl-" + "0" * 32, 0.5)  # scored on another replica
        await a.score("acme", "chatcmpl-" + "0" * 32, 0.25)
        key = experiment_key("acme", 7, "b")
        assert (await a.scores.read([key]))[key].count == 1
        assert (await b.scores.read([key]))[key].total == pytest.approx(0.25)
        ttl = await one.ttl("loragate:fb:chatcmpl-" + "0" * 32)
        assert 0 < ttl <= 120
        # The documented size: names of up to 16 characters, the longest completion id.
        long = Served("t" * 16, "a" * 16, 123456, experiment_id=99999, variant="v" * 16,
                      rollout_id=None)
        await a.remember("chatcmpl-" + "f" * 32, long)
        await a.score("t" * 16, "chatcmpl-" + "f" * 32, 0.123456789)
        used = await one.memory_usage("loragate:fb:chatcmpl-" + "f" * 32)
        assert used <= REDIS_BYTES_PER_ANSWER, used
        longest = Served("t" * 63, "a" * 63, 10**9, experiment_id=10**9, variant="v" * 63,
                         rollout_id=None)
        await a.remember("chatcmpl-" + "e" * 32, longest)
        await a.score("t" * 63, "chatcmpl-" + "e" * 32, 0.123456789)
        used = await one.memory_usage("loragate:fb:chatcmpl-" + "e" * 32)
        assert used <= REDIS_MAX_BYTES_PER_ANSWER, used
    finally:
        await one.aclose()
        await two.aclose()


# ------------------------------------------------------------------------- over HTTP


@pytest.fixture
def gw_settings_overrides() -> dict[str, Any]:
    return QUIET_LOOP  # no decision round of its own: the tests run them


@pytest.mark.unit
async def test_feedback_is_the_tenants_own_and_404_for_any_other_id(
    gw: AsyncTestClient[Any], peft_adapter: Path
) -> None:
    key_a = await create_tenant(gw, "acme")
    key_b = await create_tenant(gw, "beta")
    assert (await upload(gw, "acme", "support", peft_adapter)).status_code == 201
    own, _variant, _adapter = await ask(gw, key_a, "u1")
    chat = await gw.post("/v1/chat/completions", headers=bearer(key_a), json={
        "model": "builtin", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert chat.status_code == 200

    foreign = await gw.post("/v1/feedback", json={"id": own, "score": 0.5},
                            headers=bearer(key_b))
    unknown = await gw.post("/v1/feedback", json={"id": "cmpl-" + "0" * 32, "score": 0.5},
                            headers=bearer(key_b))
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["error"]["message"].replace(own, "ID") == \
        unknown.json()["error"]["message"].replace("cmpl-" + "0" * 32, "ID")
    assert await score(gw, key_a, own, 0.5) == 204
    assert await score(gw, key_a, chat.json()["id"], 1) == 204  # a base-model answer
    for bad in ({"id": own, "score": 1.5}, {"id": own, "score": -0.1}, {"id": own},
                {"id": own, "score": "0.5"}, {"id": "", "score": 0.5}, {"score": 0.5}):
        response = await gw.post("/v1/feedback", json=bad, headers=bearer(key_a))
        assert response.status_code == 400, bad
    assert (await gw.post("/v1/feedback", json={"id": own, "score": 0.5},
                          headers=admin())).status_code == 401
    assert (await gw.post("/v1/feedback", json={"id": own, "score": 0.5})).status_code == 401
    metrics = (await gw.get("/metrics")).text
    assert 'loragate_feedback_total{adapter="support",tenant="acme",variant=""} 1.0' in metrics


@pytest.mark.unit
async def test_experiment_figures_show_scores_per_variant_and_a_welch_test(
    gw: AsyncTestClient[Any], peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    key = await two_versions(gw, "acme", peft_adapter, peft_adapter_v2)
    body = {"variants": [{"name": "control", "adapter": "support", "weight": 50},
                         {"name": "candidate", "adapter": "support", "version": 2,
                          "weight": 50}]}
    put = await gw.put("/admin/tenants/acme/experiments/ab", json=body, headers=admin())
    assert put.status_code == 200
    answers = [await ask(gw, key, f"user-{i}", model="ab") for i in range(40)]
    rng = random.Random(1)
    given: dict[str, list[float]] = {"control": [], "candidate": []}
    # Late and out of order: scored after all answers, in shuffled order.
    for completion_id, variant, _adapter in rng.sample(answers, len(answers)):
        value = round(rng.uniform(0.6, 1.0) if variant == "candidate"
                      else rng.uniform(0.0, 0.5), 3)
        given[variant].append(value)  # type: ignore[index]
        assert await score(gw, key, completion_id, value) == 204
    got = (await gw.get("/admin/tenants/acme/experiments/ab", headers=admin())).json()
    figures = {v["name"]: v["figures"] for v in got["variants"]}
    for name, values in given.items():
        assert figures[name]["feedback_count"] == len(values)
        assert figures[name]["feedback_mean"] == pytest.approx(statistics.fmean(values))
        low, high = figures[name]["feedback_ci95"]
        assert low < statistics.fmean(values) < high
    test = figures["candidate"]["feedback_test"]
    assert test["against"] == "control" and test["t"] > 5 and test["p_value"] < 1e-6
    assert figures["control"]["feedback_test"] is None
    listed = (await gw.get("/admin/tenants/acme/experiments", headers=admin())).json()
    assert [e["name"] for e in listed] == ["ab"]
    assert listed[0]["variants"][1]["figures"]["feedback_count"] == len(given["candidate"])
