"""One simulated rollout through the real decision code, plotted: weight and per-arm scores.

    python -m bench.rollout_sim [--candidate-mean 0.74] [--stable-mean 0.70] [--seed 0]
        -> bench/results/rollout.png, bench/results/rollout.json

What is real: the catalog (SQLite in a temp dir, two uploaded versions of one adapter), its
rollout start and decision (adapters/rollouts.py), the guardrails (adapters/guardrails.py),
the gateway's sticky assignment, per-stage arm figures, answer log and score book
(gateway/inference/rollouts.py, feedback.py) and the decision round `RolloutController.tick`.
What is simulated: time (one step per simulated second), traffic (`--rps` requests per
second from a population of users), latency, errors, and labels: a share of answers gets a
score drawn around its arm's mean, after a delay of up to `--max-label-delay` seconds, so
scores arrive late and out of order.

The catalog stamps each stage's start with the wall clock; the simulation hands `tick` the
stage's start plus the simulated time since the stage began, so stage_seconds are simulated.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import random
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from adapters.base_model import BaseModelSpec
from adapters.catalog import Catalog
from adapters.db import create_engine, create_sessionmaker, upgrade_database
from adapters.storage import LocalStore
from adapters.views import Guardrails, RolloutSpec
from gateway.inference.feedback import AnswerLog, ScoreBook, Served
from gateway.inference.metrics import Metrics
from gateway.inference.rollouts import RolloutController, RolloutStats, assign

RESULTS = Path(__file__).resolve().parent / "results"
SPEC = BaseModelSpec(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     model_type="llama")


def write_adapter(directory: Path, seed: int) -> tuple[Path, Path]:
    """A PEFT LoRA adapter (q_proj, v_proj, rank 4) for SPEC."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(SPEC.num_hidden_layers):
        for module in ("q_proj", "v_proj"):
            in_f, out_f = SPEC.module_features(module)
            base = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{base}.lora_A.weight"] = rng.normal(size=(4, in_f)).astype(np.float32)
            tensors[f"{base}.lora_B.weight"] = rng.normal(size=(out_f, 4)).astype(np.float32)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
              "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory / "adapter_config.json", directory / "adapter_model.safetensors"


async def simulate(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    url = f"sqlite+aiosqlite:///{work / 'catalog.db'}"
    upgrade_database(url)
    engine = create_engine(url)
    catalog = Catalog(create_sessionmaker(engine), LocalStore(work / "artifacts"), SPEC)
    await catalog.create_tenant("acme")
    for seed in (1, 2):
        await catalog.upload_version("acme", "support", *write_adapter(work / f"v{seed}", seed),
                                     activate=None)
    spec = RolloutSpec(2, tuple(args.stages), args.stage_seconds, args.min_requests,
                       Guardrails(0.02, 1.5, args.min_score_delta))
    await catalog.start_rollout("acme", "support", spec)

    rng = random.Random(args.seed)
    scores = ScoreBook()
    stats = RolloutStats(scores=scores)
    answers = AnswerLog(ttl_s=7 * 86400, max_entries=10**7, scores=scores)
    controller = RolloutController(catalog, stats, Metrics())
    means = {"stable": args.stable_mean, "candidate": args.candidate_mean}
    labels: list[tuple[float, int, str, float]] = []  # (due at, seq, completion id, score)
    timeline: list[dict[str, Any]] = []
    scored: list[dict[str, Any]] = []
    resolution = await catalog.resolve("acme", "support")
    stage_began, seq, state = 0.0, 0, "running"
    for second in range(args.max_seconds):
        rollout = resolution.rollout
        for _ in range(np_poisson(rng, args.rps)):
            user = f"user-{rng.randrange(args.users)}"
            arm = assign(rollout, user) if rollout is not None else "stable"
            ok = rng.random() >= args.error_rate
            latency_s = max(0.01, rng.gauss(0.4, 0.05))
            if rollout is not None:
                await stats.record(rollout.id, rollout.stage, arm, ok=ok, latency_s=latency_s)
            if ok and rollout is not None and rng.random() < args.label_share:
                seq += 1
                completion_id = f"cmpl-{seq}"
                await answers.remember(completion_id, Served(
                    "acme", "support", 2 if arm == "candidate" else 1, rollout_id=rollout.id,
                    stage=rollout.stage, arm=arm))
                value = min(1.0, max(0.0, rng.gauss(means[arm], 0.2)))
                due = second + rng.uniform(1, args.max_label_delay)
                heapq.heappush(labels, (due, seq, completion_id, value))
        while labels and labels[0][0] <= second:
            _due, _seq, completion_id, value = heapq.heappop(labels)
            served = await answers.score("acme", completion_id, value)
            scored.append({"t": second, "arm": served.arm, "score": value})
        if state == "running" and second % args.tick_every == 0:
            view = await catalog.get_rollout("acme", "support")
            now = view.stage_started_at + timedelta(seconds=second - stage_began)
            for decided in await controller.tick(now):
                stage_began, state = second, decided.state
                resolution = await catalog.resolve("acme", "support")
                print(f"t={second:>5}s  {decided.history[-1].action:<11} "
                      f"{decided.history[-1].reason}")
        weight = resolution.rollout.weight if resolution.rollout is not None else (
            100.0 if state == "promoted" else 0.0)
        timeline.append({"t": second, "weight": weight, "state": state})
        if state != "running" and not labels:
            break
    final = await catalog.get_rollout("acme", "support")
    await engine.dispose()
    return {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "timeline": timeline, "scores": scored,
            "history": [e.to_dict() for e in final.history], "state": final.state}


def np_poisson(rng: random.Random, mean: float) -> int:
    # Knuth's method: a Poisson draw from the stdlib generator, so one seed drives it all.
    limit, k, p = pow(2.718281828459045, -mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def plot(result: dict[str, Any], path: Path, window_s: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, score_ax = plt.subplots(figsize=(10, 5))
    for arm, color in (("stable", "tab:blue"), ("candidate", "tab:orange")):
        points = [s for s in result["scores"] if s["arm"] == arm]
        xs, ys = [], []
        for i, point in enumerate(points):
            recent = [p["score"] for p in points[max(0, i - 400):i + 1]
                      if p["t"] > point["t"] - window_s]
            xs.append(point["t"] / 60)
            ys.append(sum(recent) / len(recent))
        score_ax.plot(xs, ys, color=color,
                      label=f"{arm}: mean of the scores received in the last {window_s // 60} min")
    score_ax.set_xlabel("minutes since the rollout started")
    score_ax.set_ylabel("feedback score (0..1)")
    weight_ax = score_ax.twinx()
    weight_ax.step([p["t"] / 60 for p in result["timeline"]],
                   [p["weight"] for p in result["timeline"]], where="post", color="tab:green",
                   label="candidate weight (%)")
    weight_ax.set_ylabel("candidate weight (%)")
    weight_ax.set_ylim(0, 105)
    handles = score_ax.get_legend_handles_labels()
    extra = weight_ax.get_legend_handles_labels()
    score_ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="lower right")
    score_ax.set_title(f"rollout of support@2 against support@1: {result['state']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=float, nargs="+", default=[5, 25, 50, 100])
    parser.add_argument("--stage-seconds", type=float, default=600)
    parser.add_argument("--min-requests", type=int, default=100)
    parser.add_argument("--min-score-delta", type=float, default=-0.05)
    parser.add_argument("--stable-mean", type=float, default=0.70)
    parser.add_argument("--candidate-mean", type=float, default=0.74)
    parser.add_argument("--rps", type=float, default=2.0)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--error-rate", type=float, default=0.005)
    parser.add_argument("--label-share", type=float, default=0.3)
    parser.add_argument("--max-label-delay", type=float, default=1800)
    parser.add_argument("--tick-every", type=int, default=5, help="simulated seconds")
    parser.add_argument("--max-seconds", type=int, default=4 * 3600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "rollout.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        result = asyncio.run(simulate(args, Path(work)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {k: result[k] for k in ("args", "state", "history")}, indent=2))
    plot(result, args.out, window_s=600)
    print(f"{result['state']}; wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
