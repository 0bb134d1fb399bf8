"""Rollouts in the catalog, on SQLite and PostgreSQL: start, read, abort, resolution, and
decisions that advance, promote or roll back exactly once across replicas and restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters import queries as q
from adapters.catalog import Catalog
from adapters.db import create_engine, create_sessionmaker
from adapters.errors import Conflict, InvalidArgument, NotFound
from adapters.guardrails import ArmFigures, Verdict, evaluate
from adapters.storage import LocalStore
from adapters.views import Guardrails, RolloutSpec, VariantSpec
from tests.support.adapter_files import SPEC, upload

PASS = Verdict(True, "guardrails held")
BREACH = Verdict(False, "error rate too high")
STABLE = ArmFigures(200, 2, 100.0, feedback_count=30, feedback_mean=0.70)
LIKED = ArmFigures(200, 2, 105.0, feedback_count=25, feedback_mean=0.80)
DISLIKED = ArmFigures(200, 2, 105.0, feedback_count=25, feedback_mean=0.40)


async def _adapter_with_two_versions(cat: Catalog, tmp_path: Path, tenant: str = "acme") -> None:
    await cat.create_tenant(tenant)
    await upload(cat, tmp_path, tenant, "a", 1)  # active
    await upload(cat, tmp_path, tenant, "a", 2)  # the candidate


async def test_start_takes_api_defaults_and_refuses_bad_bodies(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    cat = any_catalog
    await _adapter_with_two_versions(cat, tmp_path)
    bad = [
        RolloutSpec(version=0),
        RolloutSpec(version=True),  # type: ignore[arg-type]
        RolloutSpec(2, stages=()),
        RolloutSpec(2, stages=(5, 5, 100)),
        RolloutSpec(2, stages=(25, 5)),
        RolloutSpec(2, stages=(0, 100)),
        RolloutSpec(2, stages=(50, 101)),
        RolloutSpec(2, stages=(5, float("nan"))),
        RolloutSpec(2, stages=tuple(range(1, 23))),
        RolloutSpec(2, stages="5,100"),  # type: ignore[arg-type]
        RolloutSpec(2, stage_seconds=0),
        RolloutSpec(2, stage_seconds=float("inf")),
        RolloutSpec(2, min_requests=-1),
        RolloutSpec(2, min_requests=1.5),  # type: ignore[arg-type]
        RolloutSpec(2, guardrails=Guardrails(max_error_rate=1.5)),
        RolloutSpec(2, guardrails=Guardrails(max_latency_p95_ratio=0)),
        RolloutSpec(2, guardrails=Guardrails(min_score_delta=-2)),
    ]
    for spec in bad:
        with pytest.raises(InvalidArgument):
            await cat.start_rollout("acme", "a", spec)
    with pytest.raises(NotFound):
        await cat.start_rollout("acme", "a", RolloutSpec(version=9))
    with pytest.raises(NotFound):
        await cat.start_rollout("acme", "zzz", RolloutSpec(version=2))
    with pytest.raises(Conflict):
        await cat.start_rollout("acme", "a", RolloutSpec(version=1))  # the active version
    view = await cat.start_rollout("acme", "a", RolloutSpec(version=2))
    body = view.to_dict()
    assert {k: body[k] for k in ("adapter", "version", "from_version", "state", "stage")} == {
        "adapter": "a", "version": 2, "from_version": 1, "state": "running", "stage": 0,
    }  # fmt: skip
    assert body["weight"] == 5 and body["stages"] == [5, 25, 50, 100]
    assert (body["stage_seconds"], body["min_requests"]) == (600, 100)
    assert body["guardrails"] == {
        "max_error_rate": 0.02, "max_latency_p95_ratio": 1.5, "min_score_delta": -0.05,
    }  # fmt: skip
    [started] = body["history"]
    assert set(started) == {"at", "action", "reason"} and started["action"] == "started"
    assert started["at"].endswith("Z") and "version 2 against version 1" in started["reason"]
    with pytest.raises(Conflict):
        await cat.start_rollout("acme", "a", RolloutSpec(version=2))  # one is running


async def test_abort_sends_everyone_back_and_a_new_rollout_may_start(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    cat = any_catalog
    await _adapter_with_two_versions(cat, tmp_path)
    with pytest.raises(NotFound):
        await cat.get_rollout("acme", "a")  # never had one
    with pytest.raises(NotFound):
        await cat.abort_rollout("acme", "a")
    first = await cat.start_rollout("acme", "a", RolloutSpec(version=2))
    aborted = await cat.abort_rollout("acme", "a")
    assert (aborted.id, aborted.state, aborted.weight) == (first.id, "aborted", 0)
    assert [e.action for e in aborted.history] == ["started", "aborted"]
    assert "stage 0 (5%)" in aborted.history[-1].reason
    assert (await cat.get_rollout("acme", "a")).state == "aborted"  # the latest one
    resolved = await cat.resolve("acme", "a")
    assert resolved.rollout is None and resolved.adapter.version == 1  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        await cat.abort_rollout("acme", "a")
    assert await cat.decide_rollout(first.id, 0, PASS) is None  # stopped: nothing to decide
    second = await cat.start_rollout("acme", "a", RolloutSpec(version=2, stages=(50, 100)))
    assert second.id != first.id and (await cat.get_rollout("acme", "a")).id == second.id


async def test_a_liked_candidate_is_promoted_stage_by_stage(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    cat = any_catalog
    await _adapter_with_two_versions(cat, tmp_path)
    view = await cat.start_rollout("acme", "a", RolloutSpec(version=2))
    weights = [view.weight]
    for stage in range(4):
        verdict = evaluate(view.guardrails, STABLE, LIKED)
        assert verdict.passed
        decided = await cat.decide_rollout(view.id, stage, verdict)
        assert decided is not None
        view = decided
        weights.append(view.weight)
    assert weights == [5, 25, 50, 100, 100]
    assert view.state == "promoted" and view.stage == 3
    assert [e.action for e in view.history] == [
        "started", "advanced", "advanced", "advanced", "promoted",
    ]  # fmt: skip
    assert "stage 1 (25%): guardrails held" in view.history[2].reason
    assert view.history[2].reason.endswith("now stage 2 (50%)")
    assert (await cat.get_adapter("acme", "a")).active_version == 2
    resolved = await cat.resolve("acme", "a")
    assert resolved.rollout is None and resolved.adapter.version == 2  # type: ignore[union-attr]
    assert await cat.decide_rollout(view.id, 3, PASS) is None
    assert await cat.running_rollouts() == []


async def test_a_disliked_candidate_is_rolled_back_at_once(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    cat = any_catalog
    await _adapter_with_two_versions(cat, tmp_path)
    view = await cat.start_rollout("acme", "a", RolloutSpec(version=2))
    advanced = await cat.decide_rollout(view.id, 0, evaluate(view.guardrails, STABLE, LIKED))
    assert advanced is not None and advanced.stage == 1
    verdict = evaluate(view.guardrails, STABLE, DISLIKED)
    assert not verdict.passed
    rolled = await cat.decide_rollout(view.id, 1, verdict)
    assert rolled is not None and (rolled.state, rolled.stage, rolled.weight) == (
        "rolled_back", 1, 0,
    )  # fmt: skip
    last = rolled.history[-1]
    assert last.action == "rolled_back" and last.stage == 1
    assert last.reason.startswith("stage 1 (25%): mean score 0.4000 is -0.3000")
    assert (await cat.get_adapter("acme", "a")).active_version == 1  # never promoted
    resolved = await cat.resolve("acme", "a")
    assert resolved.rollout is None and resolved.adapter.version == 1  # type: ignore[union-attr]
    await cat.delete_version("acme", "a", 2)  # a rolled-back candidate may go
    assert (await cat.get_rollout("acme", "a")).version == 2  # its history stays


async def test_resolution_shows_both_arms_and_pins_bypass_it(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    cat = any_catalog
    await _adapter_with_two_versions(cat, tmp_path)
    await upload(cat, tmp_path, "acme", "a", 3)
    await cat.put_experiment("acme", "exp", [VariantSpec("c", "a", None, 1)], None)
    view = await cat.start_rollout("acme", "a", RolloutSpec(version=2, stages=(10, 100)))
    resolved = await cat.resolve("acme", "a")
    rollout = resolved.rollout
    assert resolved.kind == "adapter" and rollout is not None
    assert (rollout.id, rollout.stage, rollout.weight) == (view.id, 0, 10)
    assert resolved.adapter == rollout.stable and rollout.stable.version == 1
    assert rollout.candidate.version == 2
    assert rollout.candidate.ref.sha256 != rollout.stable.ref.sha256
    for pinned in ("a@1", "a@2", "a@3"):
        assert (await cat.resolve("acme", pinned)).rollout is None
    experiment = await cat.resolve("acme", "exp")
    assert experiment.rollout is None  # version null in an experiment: the active version
    assert experiment.experiment.variants[0].resolved.version == 1  # type: ignore[union-attr]
    await cat.decide_rollout(view.id, 0, PASS)
    again = await cat.resolve("acme", "a")
    assert again.rollout is not None and (again.rollout.stage, again.rollout.weight) == (1, 100)
    with pytest.raises(Conflict):
        await cat.delete_version("acme", "a", 2)  # the running candidate
    await cat.delete_version("acme", "a", 3)


async def test_stale_and_unknown_decisions_change_nothing(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    cat = any_catalog
    await _adapter_with_two_versions(cat, tmp_path)
    view = await cat.start_rollout("acme", "a", RolloutSpec(version=2))
    assert await cat.decide_rollout(view.id, 1, PASS) is None  # not at that stage yet
    assert await cat.decide_rollout(view.id + 100, 0, PASS) is None
    current = await cat.get_rollout("acme", "a")
    assert (current.stage, len(current.history)) == (0, 1)
    assert current.stage_started_at == view.stage_started_at


async def test_every_tenants_running_rollouts_are_listed(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    cat = any_catalog
    await _adapter_with_two_versions(cat, tmp_path, "acme")
    await _adapter_with_two_versions(cat, tmp_path, "beta")
    await cat.start_rollout("acme", "a", RolloutSpec(version=2))
    await cat.start_rollout("beta", "a", RolloutSpec(version=2, stages=(1, 2, 3)))
    listed = await cat.running_rollouts()
    assert [(r.tenant, r.adapter, r.weight) for r in listed] == [("acme", "a", 5), ("beta", "a", 1)]
    await cat.abort_rollout("acme", "a")
    assert [r.tenant for r in await cat.running_rollouts()] == ["beta"]


async def test_a_rollout_survives_a_restart(any_db_url: str, tmp_path: Path) -> None:
    def fresh_catalog():
        engine = create_engine(any_db_url)
        store = LocalStore(tmp_path / "artifacts")
        return Catalog(create_sessionmaker(engine), store, SPEC, max_rank=16), engine

    before, engine = fresh_catalog()
    await _adapter_with_two_versions(before, tmp_path)
    view = await before.start_rollout("acme", "a", RolloutSpec(version=2, stage_seconds=30))
    moved = await before.decide_rollout(view.id, 0, PASS)
    await engine.dispose()  # the gateway goes away mid-rollout

    after, engine = fresh_catalog()
    try:
        found = await after.get_rollout("acme", "a")
        assert moved is not None and found == moved  # stage, its start time and history
        assert (found.state, found.stage, found.weight) == ("running", 1, 25)
        resolved = await after.resolve("acme", "a")
        assert resolved.rollout is not None and resolved.rollout.weight == 25
        later = await after.decide_rollout(view.id, 1, PASS)
        assert later is not None and later.stage == 2
    finally:
        await engine.dispose()


async def test_two_replicas_make_one_decision_per_stage(
    catalog_pair: tuple[Catalog, Catalog], tmp_path: Path
) -> None:
    first, second = catalog_pair
    await _adapter_with_two_versions(first, tmp_path)
    stages = tuple(range(10, 101, 10))
    view = await first.start_rollout("acme", "a", RolloutSpec(version=2, stages=stages))
    for stage in range(len(stages)):
        results = await asyncio.gather(
            first.decide_rollout(view.id, stage, PASS),
            second.decide_rollout(view.id, stage, PASS),
        )
        assert sum(r is not None for r in results) == 1, (stage, results)
    final = await second.get_rollout("acme", "a")
    assert final.state == "promoted"
    assert [e.action for e in final.history].count("advanced") == len(stages) - 1
    assert [e.action for e in final.history][-1] == "promoted"
    assert (await first.get_adapter("acme", "a")).active_version == 2

    # Replicas that disagree: only one verdict lands, and the state is that verdict's.
    await upload(first, tmp_path, "acme", "a", 3)
    for _ in range(3):
        view = await first.start_rollout("acme", "a", RolloutSpec(version=3, stages=(5, 100)))
        results = await asyncio.gather(
            first.decide_rollout(view.id, 0, PASS),
            second.decide_rollout(view.id, 0, BREACH),
        )
        [winner] = [r for r in results if r is not None]
        expected = "running" if winner is results[0] else "rolled_back"
        assert winner.state == expected and (await second.get_rollout("acme", "a")) == winner
        if winner.state == "running":
            await second.abort_rollout("acme", "a")


async def test_a_replica_that_read_the_stage_before_another_decided_it_loses(
    catalog_pair: tuple[Catalog, Catalog], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The slow replica has read "stage 0, running" and only then gets the adapter's lock:
    # its conditional UPDATE, not its earlier read, must be what refuses it.
    slow, fast = catalog_pair
    await _adapter_with_two_versions(slow, tmp_path)
    view = await slow.start_rollout("acme", "a", RolloutSpec(version=2))
    slow_waiting, fast_done = asyncio.Event(), asyncio.Event()
    real_lock = q.lock_adapter

    async def lock_adapter(session, adapter_id):
        if not slow_waiting.is_set():  # the slow replica, past its read of the rollout
            slow_waiting.set()
            await fast_done.wait()
        await real_lock(session, adapter_id)

    monkeypatch.setattr(q, "lock_adapter", lock_adapter)
    slow_call = asyncio.create_task(slow.decide_rollout(view.id, 0, BREACH))
    await asyncio.wait_for(slow_waiting.wait(), 30)
    # An advance keeps the state "running": only the stage in the WHERE can stop the slow one.
    won = await fast.decide_rollout(view.id, 0, PASS)
    fast_done.set()
    assert won is not None and (won.state, won.stage) == ("running", 1)
    assert await asyncio.wait_for(slow_call, 30) is None
    final = await fast.get_rollout("acme", "a")
    assert (final.state, final.stage, [e.action for e in final.history]) == (
        "running", 1, ["started", "advanced"],
    )  # fmt: skip
