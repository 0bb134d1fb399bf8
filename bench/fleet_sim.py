"""Fleet simulation: the gateway's own router over simulated runtimes, 10 to 100 of them.

    .venv/bin/python -m bench.fleet_sim          # sweep + churn -> bench/results/fleet.{json,png}
    .venv/bin/python -m bench.fleet_sim --quick  # a smaller smoke run

The model of the runtimes and where each number comes from: bench/_fleet_model.py. Per
policy and fleet size, one seeded run: hit rate per tier, imbalance, cold loads per second,
queueing delay; then, at the largest size, runtimes leave and join and the adapters whose
first rendezvous choice changes are counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench._fleet_model import POLICIES, RESULTS, Costs, Fleet, measured_costs
from gateway.inference.router import rendezvous_order


def adapter_keys(num_adapters: int) -> list[str]:
    return [hashlib.sha256(f"adapter-{i}".encode()).hexdigest() for i in range(num_adapters)]


def workload(costs: Costs, num_adapters: int, rate: float, duration_s: float, seed: int
             ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(rate * duration_s * 1.05) + 16
    times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    weights = 1.0 / np.arange(1, num_adapters + 1) ** costs.zipf_s
    picks = rng.choice(num_adapters, size=n, p=weights / weights.sum())
    keep = times < duration_s
    return times[keep], picks[keep]


def simulate(costs: Costs, keys: list[str], num_runtimes: int, policy: str, *, load: float,
             duration_s: float, warmup_s: float, seed: int, load_factor: float,
             churn: dict[str, float] | None = None) -> dict[str, Any]:
    rate = load * num_runtimes * costs.runtime_rps
    times, picks = workload(costs, len(keys), rate, duration_s, seed)
    fleet = Fleet(costs, num_runtimes, policy, warmup_s, load_factor)
    fleet.duration_s = duration_s
    fleet.at(0.0, fleet.sample, 0.05)
    moved: dict[str, Any] = {}
    if churn:
        fleet.at(churn["leave_at"], lambda now: _leave(fleet, keys, churn, moved, now))
        fleet.at(churn["join_at"], lambda now: _join(fleet, keys, churn, moved, now))
    started = time.perf_counter()
    for t, pick in zip(times.tolist(), picks.tolist(), strict=True):
        fleet.run_until(t)
        fleet.arrival(t, keys[pick])
    fleet.run_until(duration_s + 60.0)  # let what was admitted finish
    measured_s = duration_s - warmup_s
    requests = sum(fleet.tiers.values())
    delays = np.array(fleet.delays) if fleet.delays else np.zeros(1)
    result = {
        "policy": policy, "runtimes": num_runtimes, "adapters": len(keys),
        "offered_rps": round(rate, 1), "requests": requests,
        "hit_rate": {t: round(n / max(requests, 1), 4) for t, n in fleet.tiers.items()},
        "first_touch_share": round(fleet.first_touch / max(requests, 1), 4),
        "cold_loads_per_s": round(fleet.cold_loads / measured_s, 1),
        "imbalance_max_over_mean": round(float(np.mean(fleet.imbalance)), 3),
        "imbalance_p99": round(float(np.percentile(fleet.imbalance, 99)), 3),
        "queue_delay_ms": {f"p{q}": round(float(np.percentile(delays, q)) * 1000, 2)
                           for q in (50, 90, 99)},
        "shed_share": round(fleet.shed / max(requests + fleet.shed, 1), 4),
        "completed": fleet.completed,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if churn:
        result["churn"] = {**moved, **_cold_around(fleet.cold_load_times, churn)}
    return result


def _homes(keys: list[str], urls: list[str]) -> list[str]:
    return [rendezvous_order(k, urls)[0] for k in keys]


def _leave(fleet: Fleet, keys: list[str], churn: dict[str, float], moved: dict[str, Any],
           now: float) -> None:
    before = list(fleet.router.runtimes)
    count = int(churn["fraction"] * len(before))
    fleet.set_size(len(before) - count, leave=count)
    after = list(fleet.router.runtimes)
    moved["leave"] = {"runtimes": count, "at_s": now,
                      "adapters_moved": _moved(keys, before, after),
                      "draining_at_once": len(fleet.router.draining)}


def _join(fleet: Fleet, keys: list[str], churn: dict[str, float], moved: dict[str, Any],
          now: float) -> None:
    before = list(fleet.router.runtimes)
    count = int(churn["fraction"] * (len(before) / (1 - churn["fraction"])))
    fleet.set_size(len(before) + count)
    after = list(fleet.router.runtimes)
    moved["join"] = {"runtimes": count, "at_s": now,
                     "adapters_moved": _moved(keys, before, after)}


def _moved(keys: list[str], before: list[str], after: list[str]) -> dict[str, float]:
    old, new = _homes(keys, before), _homes(keys, after)
    n = sum(a != b for a, b in zip(old, new, strict=True))
    return {"count": n, "share": round(n / len(keys), 4),
            "ideal_share": round(abs(len(after) - len(before)) / max(len(after), len(before)), 4)}


def _cold_around(times: list[float], churn: dict[str, float], window: float = 1.0
                 ) -> dict[str, float]:
    arr = np.array(times)

    def rate(lo: float, hi: float) -> float:
        return round(float(((arr >= lo) & (arr < hi)).sum()) / (hi - lo), 1)

    leave, join = churn["leave_at"], churn["join_at"]
    return {"cold_loads_per_s_before": rate(leave - window, leave),
            "cold_loads_per_s_after_leave": rate(leave, leave + window),
            "cold_loads_per_s_after_join": rate(join, join + window)}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| runtimes | policy | device hit | loading | host hit | store (cold) | first touch "
             "| imbalance max/mean | cold loads/s | queue p50 / p90 / p99 ms | shed |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        h, q = r["hit_rate"], r["queue_delay_ms"]
        lines.append(
            f"| {r['runtimes']} | {r['policy']} | {h['device']:.1%} | {h['loading']:.1%} | "
            f"{h['host']:.1%} | {h['store']:.1%} | {r['first_touch_share']:.1%} | "
            f"{r['imbalance_max_over_mean']:.2f} | "
            f"{r['cold_loads_per_s']:.0f} | {q['p50']:.1f} / {q['p90']:.1f} / {q['p99']:.1f} | "
            f"{r['shed_share']:.2%} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hit_ax, imb_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for policy in POLICIES:
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["runtimes"])
        xs = [r["runtimes"] for r in mine]
        hit_ax.plot(xs, [100 * r["hit_rate"]["device"] for r in mine], marker="o", label=policy)
        imb_ax.plot(xs, [r["imbalance_max_over_mean"] for r in mine], marker="o", label=policy)
    hit_ax.set(xlabel="runtimes", ylabel="device-slot hit rate (%)", ylim=(0, 100),
               title="adapter already in a slot")
    imb_ax.set(xlabel="runtimes", ylabel="max / mean in flight", ylim=(1, None),
               title="load imbalance")
    for ax in (hit_ax, imb_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("loragate router, simulated fleet (bench/fleet_sim.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,20,30,50,75,100", help="runtime counts of the sweep")
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--load", type=float, default=0.7, help="offered load / fleet capacity")
    parser.add_argument("--duration-s", type=float, default=20.0, help="simulated seconds")
    parser.add_argument("--warmup-s", type=float, default=8.0, help="not counted")
    parser.add_argument("--load-factor", type=float, default=1.25, help="the router's bound")
    parser.add_argument("--host-load-s", type=float, default=0.001)
    parser.add_argument("--cold-load-s", type=float,
                        help="instead of the measured cold load (e.g. a remote S3 fetch)")
    parser.add_argument("--churn", type=float, default=0.1,
                        help="share of the largest fleet that leaves, then as many join")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="10 and 20 runtimes, 4 s")
    parser.add_argument("--out", type=Path, default=RESULTS / "fleet.json")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.duration_s, args.warmup_s = "10,20", 4.0, 1.0
    costs = measured_costs(RESULTS, args.host_load_s)
    if args.cold_load_s is not None:
        costs = replace(costs, cold_load_s=args.cold_load_s,
                        sources={**costs.sources, "cold_load_s": "--cold-load-s (assumed)"})
    keys = adapter_keys(args.adapters)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"costs: step {costs.step_one_s * 1000:.2f} ms (batch 1) .. "
          f"{costs.step_full_s * 1000:.2f} ms (batch {costs.max_running}), cold load "
          f"{costs.cold_load_s * 1000:.2f} ms, {costs.slots} slots, {costs.host_slots} host, "
          f"{costs.max_tokens} tokens/request: {costs.runtime_rps:.0f} req/s per runtime")
    common = {"load": args.load, "duration_s": args.duration_s, "warmup_s": args.warmup_s,
              "seed": args.seed, "load_factor": args.load_factor}
    rows = []
    for size in sizes:
        for policy in POLICIES:
            row = simulate(costs, keys, size, policy, **common)
            rows.append(row)
            print(f"{size:4d} {policy:13s} device {row['hit_rate']['device']:.1%} "
                  f"imbalance {row['imbalance_max_over_mean']:.2f} "
                  f"p99 {row['queue_delay_ms']['p99']:.1f} ms ({row['wall_s']} s)", flush=True)
    span = args.duration_s - args.warmup_s
    churn = {"fraction": args.churn, "leave_at": args.warmup_s + span / 3,
             "join_at": args.warmup_s + 2 * span / 3}
    churn_row = simulate(costs, keys, max(sizes), "rendezvous", churn=churn, **common)
    print(table(rows))
    print(f"churn at {max(sizes)} runtimes (rendezvous): {json.dumps(churn_row['churn'])}")
    out = {
        "command": "python -m bench.fleet_sim " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("out", "quick") and v is not None),
        "costs": {k: v for k, v in vars(costs).items()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sweep": rows,
        "churn": churn_row,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
