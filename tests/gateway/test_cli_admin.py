"""`loragate admin` commands of issue 16 (keys, tenants, adapters, experiments, rollouts):
the calls they make and the rollout status view, against a recording transport."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from gateway.cli import admin_client
from gateway.cli.main import _parser

pytestmark = pytest.mark.unit

ROLLOUT = {
    "adapter": "support", "version": 2, "from_version": 1, "state": "running", "stage": 1,
    "weight": 25, "stages": [5, 25, 50, 100], "stage_seconds": 600, "min_requests": 100,
    "guardrails": {"max_error_rate": 0.02, "max_latency_p95_ratio": 1.5,
                   "min_score_delta": -0.05},
    "stage_started_at": "2026-12-01T10:10:00Z", "created_at": "2026-12-01T10:00:00Z",
    "updated_at": "2026-12-01T10:10:00Z",
    "history": [
        {"at": "2026-12-01T10:00:00Z", "action": "started",
         "reason": "version 2 against version 1, stage 0 (5%)"},
        {"at": "2026-12-01T10:10:00Z", "action": "advanced",
         "reason": "stage 0 (5%): guardrails held; now stage 1 (25%)"}],
    "stable": {"requests": 40, "errors": 0, "p95_latency_ms": 120.0, "feedback_count": 3,
               "feedback_mean": 0.7, "feedback_ci95": None},
    "candidate": {"requests": 12, "errors": 1, "p95_latency_ms": None, "feedback_count": 0,
                  "feedback_mean": None, "feedback_ci95": None},
    "stage_figures": [
        {"stage": 0, "weight": 5,
         "stable": {"requests": 300, "errors": 2, "p95_latency_ms": 110.0,
                    "feedback_count": 30, "feedback_mean": 0.71, "feedback_ci95": None},
         "candidate": {"requests": 101, "errors": 0, "p95_latency_ms": 100.0,
                       "feedback_count": 11, "feedback_mean": 0.74, "feedback_ci95": None}},
        {"stage": 1, "weight": 25,
         "stable": {"requests": 40, "errors": 0, "p95_latency_ms": 120.0,
                    "feedback_count": 3, "feedback_mean": 0.7, "feedback_ci95": None},
         "candidate": {"requests": 12, "errors": 1, "p95_latency_ms": None,
                       "feedback_count": 0, "feedback_mean": None, "feedback_ci95": None}}],
}


def run(argv: list[str]) -> tuple[int, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "DELETE":
            return httpx.Response(204)
        if request.url.path.endswith("/rollout"):
            return httpx.Response(200, json=ROLLOUT)
        return httpx.Response(200, json={"ok": True})

    args = _parser().parse_args(["admin", *argv])
    code = admin_client.run(args, "http://gw", "token", httpx.MockTransport(answer))
    return code, seen


def body(request: httpx.Request) -> Any:
    return json.loads(request.content) if request.content else None


@pytest.mark.parametrize(("argv", "method", "path", "sent"), [
    (["key-list", "acme"], "GET", "/admin/tenants/acme/keys", None),
    (["key-create", "acme", "--name", "ci", "--expires-at", "2030-01-01T00:00:00Z"], "POST",
     "/admin/tenants/acme/keys", {"name": "ci", "expires_at": "2030-01-01T00:00:00Z"}),
    (["tenant-update", "acme", "--rpm", "1200", "--tpm", "none"], "PATCH",
     "/admin/tenants/acme", {"requests_per_minute": 1200, "tokens_per_minute": None}),
    (["tenant-update", "acme", "--tpm", "5"], "PATCH", "/admin/tenants/acme",
     {"tokens_per_minute": 5}),
    (["tenant-delete", "acme"], "DELETE", "/admin/tenants/acme", None),
    (["adapter-delete", "acme", "support"], "DELETE", "/admin/tenants/acme/adapters/support",
     None),
    (["experiment-list", "acme"], "GET", "/admin/tenants/acme/experiments", None),
    (["experiment-get", "acme", "ab"], "GET", "/admin/tenants/acme/experiments/ab", None),
    (["experiment-delete", "acme", "ab"], "DELETE", "/admin/tenants/acme/experiments/ab",
     None),
    (["rollout", "start", "acme", "support", "2", "--stages", "10,50,100",
      "--stage-seconds", "300", "--min-requests", "50", "--min-score-delta", "-0.02"], "PUT",
     "/admin/tenants/acme/adapters/support/rollout",
     {"version": 2, "stages": [10, 50, 100], "stage_seconds": 300, "min_requests": 50,
      "guardrails": {"min_score_delta": -0.02}}),
    (["rollout", "status", "acme", "support"], "GET",
     "/admin/tenants/acme/adapters/support/rollout", None),
    (["rollout", "abort", "acme", "support"], "DELETE",
     "/admin/tenants/acme/adapters/support/rollout", None),
])
def test_each_command_makes_its_call(argv: list[str], method: str, path: str, sent: Any,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, seen = run(argv)
    assert code == 0, capsys.readouterr().err
    assert (seen[0].method, seen[0].url.path, body(seen[0])) == (method, path, sent)


def test_rollout_status_shows_the_stages_and_history(
    capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["rollout", "status", "acme", "support"])[0] == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == ("acme/support: version 2 against version 1: running, 25% on the "
                        "candidate")
    rows = [line for line in lines if line[2:7].strip().isdigit()]
    assert [row.split()[0:3] for row in rows[:2]] == [["0", "5%", "passed"],
                                                      [">", "1", "25%"]]
    assert "current" in rows[1] and "0.740 (11)" in rows[0] and "110ms" in rows[0]
    assert [row.split() for row in rows[2:]] == [["2", "50%"], ["3", "100%"]]
    assert "advanced" in out and "now stage 1 (25%)" in out
    assert run(["rollout", "status", "acme", "support", "--json"])[0] == 0
    assert json.loads(capsys.readouterr().out) == ROLLOUT


def test_a_bad_limit_is_refused_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    code, seen = run(["tenant-update", "acme", "--rpm", "lots"])
    assert code == 1 and seen == []
    assert "'none'" in capsys.readouterr().err
