"""Guardrail verdicts and stage ends, and sticky arms: pure functions, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from adapters.guardrails import ArmFigures, evaluate, stage_due
from adapters.views import (
    NUM_BUCKETS,
    AdapterRefData,
    Guardrails,
    ResolvedAdapter,
    ResolvedRollout,
    RolloutView,
)

pytestmark = pytest.mark.unit

G = Guardrails(max_error_rate=0.02, max_latency_p95_ratio=1.5, min_score_delta=-0.05)
STABLE = ArmFigures(requests=1000, errors=10, p95_latency_ms=200.0)


def test_a_candidate_like_the_stable_arm_passes() -> None:
    verdict = evaluate(G, STABLE, ArmFigures(1000, 20, 290.0))
    assert verdict.passed, verdict.reason
    assert "error rate 0.0200 vs 0.0100" in verdict.reason
    assert "no feedback for both arms" in verdict.reason


@pytest.mark.parametrize(
    ("candidate", "words"),
    [
        (ArmFigures(1000, 31, 200.0), "above the stable arm's 0.0100"),  # 0.021 excess
        (ArmFigures(1000, 10, 301.0), "1.505 times the stable arm's 200.0 ms"),
    ],
)
def test_errors_and_latency_past_their_bounds_breach(candidate: ArmFigures, words: str) -> None:
    verdict = evaluate(G, STABLE, candidate)
    assert not verdict.passed and words in verdict.reason


def test_the_error_bound_is_over_the_stable_arm_not_absolute() -> None:
    # A flaky runtime fails both arms alike: that is not the candidate's fault.
    flaky = ArmFigures(1000, 100, 200.0)
    assert evaluate(G, flaky, ArmFigures(1000, 115, 200.0)).passed
    assert not evaluate(G, flaky, ArmFigures(1000, 121, 200.0)).passed


def test_scores_count_only_when_both_arms_got_feedback() -> None:
    disliked = ArmFigures(1000, 10, 200.0, feedback_count=50, feedback_mean=0.60)
    liked_stable = ArmFigures(1000, 10, 200.0, feedback_count=40, feedback_mean=0.70)
    verdict = evaluate(G, liked_stable, disliked)
    assert not verdict.passed and "-0.1000 from the stable arm's 0.7000" in verdict.reason
    # The same candidate scores, but no stable feedback yet: nothing to compare.
    assert evaluate(G, STABLE, disliked).passed
    slightly_worse = ArmFigures(1000, 10, 200.0, feedback_count=50, feedback_mean=0.66)
    passed = evaluate(G, liked_stable, slightly_worse)
    assert passed.passed and "score delta -0.0400 (n=50/40)" in passed.reason


def test_latency_without_a_stable_p95_is_not_judged() -> None:
    assert evaluate(G, ArmFigures(10, 0, None), ArmFigures(10, 0, 5000.0)).passed
    assert evaluate(G, ArmFigures(10, 0, 0.0), ArmFigures(10, 0, 5000.0)).passed
    assert evaluate(G, ArmFigures(0, 0, None), ArmFigures(0, 0, None)).passed  # no traffic


def _view(state: str = "running", stage: int = 0) -> RolloutView:
    started = datetime(2026, 1, 1, tzinfo=UTC)
    return RolloutView(
        1, "acme", "a", 2, 1, state, stage, (5, 25, 100), 600.0, 100, G,  # type: ignore[arg-type]
        started, started, started,
    )  # fmt: skip


def test_a_stage_ends_after_its_time_with_enough_requests_in_each_arm() -> None:
    view = _view()
    start = view.stage_started_at
    enough = ArmFigures(requests=100)
    assert stage_due(view, start + timedelta(seconds=600), enough, enough)
    assert not stage_due(view, start + timedelta(seconds=599), enough, enough)
    assert not stage_due(view, start + timedelta(hours=1), enough, ArmFigures(requests=99))
    assert not stage_due(view, start + timedelta(hours=1), ArmFigures(requests=99), enough)
    assert not stage_due(_view("promoted"), start + timedelta(hours=1), enough, enough)
    naive_now = (start + timedelta(seconds=600)).replace(tzinfo=None)  # read as UTC
    assert stage_due(view, naive_now, enough, enough)


def test_weight_follows_the_state() -> None:
    assert [_view(stage=i).weight for i in range(3)] == [5, 25, 100]
    assert (_view("promoted", 1).weight, _view("rolled_back", 1).weight) == (100, 0)
    assert _view("aborted").weight == 0 and _view(stage=2).last_stage


def _resolved(weight: float) -> ResolvedRollout:
    ref = AdapterRefData("k" * 64, "file:///x", 4, 8.0, ("q_proj",), False)
    arm = ResolvedAdapter("a", 1, ref)
    return ResolvedRollout(7, 0, weight, arm, arm)


def test_a_user_on_the_candidate_stays_there_as_the_weight_grows() -> None:
    weights = [0.5, 5, 25, 50, 100]
    previous: set[int] = set()
    for weight in weights:
        rollout = _resolved(weight)
        on_candidate = {b for b in range(NUM_BUCKETS) if rollout.arm(b) == "candidate"}
        assert previous <= on_candidate  # nobody flips back to stable
        assert len(on_candidate) == round(weight * NUM_BUCKETS / 100)
        previous = on_candidate
    assert _resolved(0).arm(0) == "stable"
    assert _resolved(7).hash_seed == "rollout:7"
