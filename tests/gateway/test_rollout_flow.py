"""Rollouts end to end over HTTP (stub runtime behind, SQLite catalog): a disliked candidate
rolled back, a liked one promoted, sticky users, a gateway restart mid-rollout, metrics.

Each decision round is driven by the test (`tick` as if the stage had lasted an hour); the
app's own loop is held off, so nothing depends on timing."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from adapters.db import upgrade_database
from adapters.views import Guardrails, ResolvedAdapter, ResolvedRollout, RolloutView
from gateway.app import create_app
from gateway.inference.metrics import Metrics
from gateway.inference.rollouts import RolloutController, RolloutStats, assign
from tests.support.delivery import (
    QUIET_LOOP,
    ask,
    get_rollout,
    score_arms,
    services_of,
    start_rollout,
    tick,
    traffic,
    two_versions,
    users,
)
from tests.support.gw_helpers import admin, make_settings

pytestmark = pytest.mark.unit


@pytest.fixture
def gw_settings(tmp_path: Path, base_model_dir: Path, stub_url: str) -> Any:
    settings = make_settings(tmp_path / "data", base_model_dir, runtimes=(stub_url,),
                             **QUIET_LOOP)
    upgrade_database(settings.database_url)
    return settings


@pytest.fixture
async def gw(gw_settings: Any) -> Any:
    async with AsyncTestClient(create_app(gw_settings)) as client:
        yield client


def metric(text: str, name: str, **labels: str) -> float | None:
    """The sample of `name` with exactly these labels (in any order), or None."""
    for match in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if found == labels:
            return float(match.group(2))
    return None


def arms_of(served: dict[str, Any]) -> dict[str, str]:
    return {user: arm for user, (_id, arm, _adapter) in served.items()}


async def test_a_disliked_candidate_is_rolled_back_with_the_reason(
    gw: AsyncTestClient[Any], peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    key = await two_versions(gw, "acme", peft_adapter, peft_adapter_v2)
    started = await start_rollout(gw, "acme", stages=[50, 100], min_requests=5)
    assert (started["state"], started["weight"], started["from_version"]) == ("running", 50, 1)

    served = await traffic(gw, key, users(40))
    for _id, arm, adapter in served.values():
        assert adapter == ("support@2" if arm == "candidate" else "support@1")
    assert set(arms_of(served).values()) == {"stable", "candidate"}
    # A pinned version bypasses the rollout, whichever arm the user is in.
    for pinned in ("support@1", "support@2"):
        _id, variant, adapter = await ask(gw, key, "user-0", model=pinned)
        assert (variant, adapter) == (None, pinned)
    # Error rate and latency are fine: only the users' scores tell the candidate is worse.
    await score_arms(gw, key, served, {"stable": 0.9, "candidate": 0.2})

    decided = await tick(gw)
    assert [d.state for d in decided] == ["rolled_back"]
    rollout = await get_rollout(gw, "acme")
    assert (rollout["state"], rollout["weight"], rollout["stage"]) == ("rolled_back", 0, 0)
    assert [e["action"] for e in rollout["history"]] == ["started", "rolled_back"]
    assert "mean score 0.2000" in rollout["history"][-1]["reason"]
    candidate = rollout["candidate"]
    assert candidate["feedback_count"] == sum(a == "candidate" for a in arms_of(served).values())
    assert candidate["feedback_mean"] == pytest.approx(0.2)
    assert rollout["stable"]["feedback_mean"] == pytest.approx(0.9)

    # Everyone is back on the active version, which never changed.
    for user in users(10):
        _id, variant, adapter = await ask(gw, key, user)
        assert (variant, adapter) == (None, "support@1")
    listed = (await gw.get("/admin/tenants/acme/adapters", headers=admin())).json()
    assert listed[0]["active_version"] == 1
    text = (await gw.get("/metrics")).text
    assert metric(text, "loragate_rollout_rollbacks_total", tenant="acme", adapter="support") == 1
    assert metric(text, "loragate_rollout_weight", tenant="acme", adapter="support") is None
    assert await tick(gw) == []  # nothing left to decide


async def test_a_liked_candidate_is_promoted_after_the_last_stage(
    gw: AsyncTestClient[Any], peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    key = await two_versions(gw, "acme", peft_adapter, peft_adapter_v2)
    await start_rollout(gw, "acme", stages=[50, 100], min_requests=5)
    served = await traffic(gw, key, users(40))
    await score_arms(gw, key, served, {"stable": 0.8, "candidate": 0.9})
    assert [d.state for d in await tick(gw)] == ["running"]

    text = (await gw.get("/metrics")).text
    assert metric(text, "loragate_rollout_stage", tenant="acme", adapter="support") == 1
    assert metric(text, "loragate_rollout_weight", tenant="acme", adapter="support") == 100
    rollout = await get_rollout(gw, "acme")
    assert (rollout["stage"], rollout["weight"]) == (1, 100)
    assert "now stage 1 (100%)" in rollout["history"][-1]["reason"]

    # At 100% every user is on the candidate; the stable baseline is stage 0's stable arm.
    served = await traffic(gw, key, users(10))
    assert set(arms_of(served).values()) == {"candidate"}
    await score_arms(gw, key, served, {"candidate": 0.9})
    assert [d.state for d in await tick(gw)] == ["promoted"]
    rollout = await get_rollout(gw, "acme")
    assert rollout["state"] == "promoted" and rollout["weight"] == 100
    assert [e["action"] for e in rollout["history"]] == ["started", "advanced", "promoted"]
    assert [s["stage"] for s in rollout["stage_figures"]] == [0, 1]
    assert rollout["stage_figures"][0]["stable"]["feedback_mean"] == pytest.approx(0.8)
    listed = (await gw.get("/admin/tenants/acme/adapters", headers=admin())).json()
    assert listed[0]["active_version"] == 2
    _id, variant, adapter = await ask(gw, key, "someone")
    assert (variant, adapter) == (None, "support@2")
    text = (await gw.get("/metrics")).text
    assert metric(text, "loragate_rollout_rollbacks_total", tenant="acme", adapter="support") \
        is None


async def test_users_are_sticky_as_the_weight_grows(
    gw: AsyncTestClient[Any], peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    key = await two_versions(gw, "acme", peft_adapter, peft_adapter_v2)
    await start_rollout(gw, "acme", stages=[5, 25, 50, 100], min_requests=0)
    people = users(60)
    on_candidate: set[str] = set()
    for stage, weight in enumerate([5, 25, 50, 100]):
        rollout = await get_rollout(gw, "acme")
        assert (rollout["stage"], rollout["weight"]) == (stage, weight)
        first = arms_of(await traffic(gw, key, people))
        again = arms_of(await traffic(gw, key, people))
        assert first == again, "a user changed arm within a stage"
        now_candidate = {u for u, arm in first.items() if arm == "candidate"}
        assert on_candidate <= now_candidate, "a candidate user went back to the stable arm"
        on_candidate = now_candidate
        await tick(gw)
    assert on_candidate == set(people)
    assert (await get_rollout(gw, "acme"))["state"] == "promoted"


def test_arms_are_sticky_and_follow_the_weight_over_5000_users() -> None:
    ref = ResolvedAdapter.__new__(ResolvedAdapter)
    people = users(5000)
    before: set[str] = set()
    for weight in (5, 25, 50, 100):
        rollout = ResolvedRollout(id=9, stage=0, weight=weight, stable=ref, candidate=ref)
        now = {u for u in people if assign(rollout, u) == "candidate"}
        assert abs(len(now) / len(people) - weight / 100) < 0.02
        assert before <= now
        before = now
    other = ResolvedRollout(id=10, stage=0, weight=50, stable=ref, candidate=ref)
    half = ResolvedRollout(id=9, stage=0, weight=50, stable=ref, candidate=ref)
    differs = sum(assign(other, u) != assign(half, u) for u in people[:1000])
    assert differs > 300, "the arm should depend on the rollout, not only on the user"
    rng = random.Random(4)
    anonymous = [assign(half, None, rng) for _ in range(2000)]
    assert 0.45 < anonymous.count("candidate") / 2000 < 0.55


async def test_a_rollout_survives_a_gateway_restart(
    gw_settings: Any, peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    async with AsyncTestClient(create_app(gw_settings)) as first:
        key = await two_versions(first, "acme", peft_adapter, peft_adapter_v2)
        await start_rollout(first, "acme", stages=[25, 50, 100], min_requests=3)
        await traffic(first, key, users(30))
        assert [d.stage for d in await tick(first)] == [1]
        arms_before = arms_of(await traffic(first, key, users(30)))

    async with AsyncTestClient(create_app(gw_settings)) as second:
        rollout = await get_rollout(second, "acme")
        assert (rollout["state"], rollout["stage"], rollout["weight"]) == ("running", 1, 50)
        assert [e["action"] for e in rollout["history"]] == ["started", "advanced"]
        # Figures were in process and went with the first gateway: stage 1 needs traffic here.
        assert await tick(second) == []
        # Same users, same arms: the seed is the rollout's id, kept in the catalog.
        assert arms_of(await traffic(second, key, users(30))) == arms_before
        assert [d.stage for d in await tick(second)] == [2]
        await traffic(second, key, users(5))
        assert [d.state for d in await tick(second)] == ["promoted"]
        assert services_of(second).rollouts.tick_s == 3600.0


async def test_rollout_routes_answer_404_409_and_400(
    gw: AsyncTestClient[Any], peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    await two_versions(gw, "acme", peft_adapter, peft_adapter_v2)
    path = "/admin/tenants/acme/adapters/support/rollout"
    assert (await gw.get(path, headers=admin())).status_code == 404
    assert (await gw.delete(path, headers=admin())).status_code == 404
    for bad in ({"version": 2, "stages": [50, 25]}, {"version": 2, "stage_seconds": 0},
                {"version": 2, "guardrails": {"max_error_rate": 2}}, {"stages": [5]},
                {"version": 2, "extra": 1}):
        assert (await gw.put(path, json=bad, headers=admin())).status_code == 400, bad
    assert (await gw.put(path, json={"version": 1}, headers=admin())).status_code == 409
    assert (await gw.put(path, json={"version": 7}, headers=admin())).status_code == 404
    started = await start_rollout(gw, "acme", guardrails={"max_error_rate": 0.02})
    assert started["stages"] == [5, 25, 50, 100] and started["stage_seconds"] == 600
    assert started["guardrails"] == {"max_error_rate": 0.02, "max_latency_p95_ratio": 1.5,
                                     "min_score_delta": -0.05}
    assert (await gw.put(path, json={"version": 2}, headers=admin())).status_code == 409
    assert (await gw.delete(path, headers=admin())).status_code == 204
    rollout = await get_rollout(gw, "acme")
    assert (rollout["state"], rollout["weight"]) == ("aborted", 0)
    assert rollout["history"][-1]["action"] == "aborted"
    assert datetime.fromisoformat(rollout["updated_at"]) <= datetime.now(UTC)


async def test_a_100_percent_stage_is_judged_against_the_stable_arm_before_it() -> None:
    stats = RolloutStats()
    for _ in range(10):
        await stats.record(5, 0, "stable", ok=True, latency_s=0.1)
        await stats.record(5, 1, "candidate", ok=True, latency_s=0.1)
    await stats.record(5, 1, "candidate", ok=False, latency_s=0.1)
    now = datetime.now(UTC)

    def view(stages: tuple[float, ...], stage: int) -> RolloutView:
        return RolloutView(5, "acme", "support", 2, 1, "running", stage, stages, 600, 10,
                           Guardrails(), now - timedelta(hours=1), now, now)

    controller = RolloutController(None, stats, Metrics())
    stable, candidate = await controller.judged(view((50, 100), 1))
    assert (stable.requests, candidate.requests, candidate.errors) == (10, 11, 1)
    # A single 100% stage: only the candidate's own figures count.
    stable, candidate = await controller.judged(view((100,), 0))
    assert (stable.requests, stable.errors, candidate.requests) == (10, 0, 0)
    # Below 100% the stage's own stable arm is the baseline.
    stable, _ = await controller.judged(view((50, 100), 0))
    assert stable.requests == 10
    stable, _ = await controller.judged(view((25, 50, 100), 1))
    assert stable.requests == 0
