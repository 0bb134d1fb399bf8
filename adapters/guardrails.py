"""When a rollout's stage ends and what its guardrails say: pure functions, no DB, no torch.

The gateway holds each arm's figures over the current stage (requests, errors, p95 latency,
feedback count and mean score) and asks, per running rollout, `stage_due` and then
`evaluate`; the verdict goes to `Catalog.decide_rollout`, which applies it exactly once.

    due     = lasted(stage_seconds) and stable.requests >= min and candidate.requests >= min
    breach  = candidate.error_rate - stable.error_rate > max_error_rate
           or candidate.p95 / stable.p95 > max_latency_p95_ratio        (both p95 known)
           or candidate.mean - stable.mean < min_score_delta            (both got feedback)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from adapters.views import Guardrails, RolloutView, as_utc


@dataclass(frozen=True, slots=True)
class ArmFigures:
    """One arm of a rollout over one stage."""

    requests: int = 0
    errors: int = 0
    p95_latency_ms: float | None = None  # None: no successful answer yet
    feedback_count: int = 0
    feedback_mean: float | None = None  # mean score in [0, 1]; None without feedback

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    reason: str  # goes into the rollout's history as it is


def stage_due(
    rollout: RolloutView, now: datetime, stable: ArmFigures, candidate: ArmFigures
) -> bool:
    """Whether the current stage has lasted `stage_seconds` and each arm has min_requests."""
    if rollout.state != "running":
        return False
    lasted = (as_utc(now) - rollout.stage_started_at).total_seconds()
    return (
        lasted >= rollout.stage_seconds
        and stable.requests >= rollout.min_requests
        and candidate.requests >= rollout.min_requests
    )


def evaluate(guardrails: Guardrails, stable: ArmFigures, candidate: ArmFigures) -> Verdict:
    """Compare the candidate with the stable arm; the first breach found is the reason."""
    excess = candidate.error_rate - stable.error_rate
    facts = [f"error rate {candidate.error_rate:.4f} vs {stable.error_rate:.4f}"]
    if excess > guardrails.max_error_rate:
        return Verdict(
            False,
            f"error rate {candidate.error_rate:.4f} is {excess:.4f} above the stable arm's"
            f" {stable.error_rate:.4f} (max {guardrails.max_error_rate:g})",
        )
    ratio = _ratio(candidate.p95_latency_ms, stable.p95_latency_ms)
    if ratio is not None:
        facts.append(f"p95 latency ratio {ratio:.3f}")
        if ratio > guardrails.max_latency_p95_ratio:
            return Verdict(
                False,
                f"p95 latency {candidate.p95_latency_ms:.1f} ms is {ratio:.3f} times the"
                f" stable arm's {stable.p95_latency_ms:.1f} ms"
                f" (max {guardrails.max_latency_p95_ratio:g})",
            )
    if (
        candidate.feedback_mean is not None
        and stable.feedback_mean is not None
        and min(candidate.feedback_count, stable.feedback_count) > 0
    ):
        delta = candidate.feedback_mean - stable.feedback_mean
        facts.append(
            f"score delta {delta:+.4f} (n={candidate.feedback_count}/{stable.feedback_count})"
        )
        if delta < guardrails.min_score_delta:
            return Verdict(
                False,
                f"mean score {candidate.feedback_mean:.4f} is {delta:+.4f} from the stable"
                f" arm's {stable.feedback_mean:.4f} (min {guardrails.min_score_delta:+g})",
            )
    else:
        facts.append("no feedback for both arms")
    return Verdict(True, "guardrails held: " + ", ".join(facts))


def _ratio(candidate: float | None, stable: float | None) -> float | None:
    # A stable p95 of 0 (or none yet) gives no ratio to judge; the error rate still counts.
    if candidate is None or stable is None or stable <= 0:
        return None
    return candidate / stable
