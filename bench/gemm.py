"""The step's projections through F.linear, oneDNN and our kernel over packed weights, side by side.

    .venv/bin/python -m bench.gemm [--model DIR] [--batches 1,8,32,48,64,256] [--dtype float32]
        -> bench/results/gemm.json

Every projection of every layer of the model's shapes (config.json only: the weights are
random, distinct per layer) and the lm_head, run back to back at each batch size, as a decode
step runs them: each weight streams from memory, not from cache. Per batch the best of
`--rounds` passes of each path, interleaved, so that a load spike hits both alike:
  f_linear   torch's F.linear (MKL's sgemm on x86 CPU builds)
  mkl_packed MKL's packed GEMM (`torch.ops.mkl._mkl_linear`, weights packed for that batch)
  onednn     oneDNN's linear over weights reordered once (runtime/model/linear.py: the
             engine's default for bf16 where the CPU runs oneDNN's bf16 GEMM, and for
             float32 where ours has no vector build)
  native     our kernel over weights packed once (runtime/model/gemm_cpu.py: the engine's
             default for float32 on AVX2 and AVX-512 CPUs)
  native_cached  our kernel over the same shapes with one weight per shape, reused by every
             layer, so that those weights stay in L3 (the lm_head streams in both): the
             same arithmetic without the layers' stream from memory (native / native_cached
             is what streaming them costs)
and the largest difference between oneDNN's outputs and F.linear's on one projection, and
between ours and F.linear's.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from runtime.model import gemm_cpu
from runtime.model.linear import onednn_available, onednn_linear, reorder_for_onednn
from runtime.model.weights import ModelArgs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / ".cache" / "smollm2-135m-instruct"


def shapes_of(args: ModelArgs) -> list[tuple[int, int]]:
    """[out, in] of one layer's fused projections (the engine's layout), as a step runs them."""
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    return [(q + 2 * kv, args.hidden_size), (args.hidden_size, q),
            (2 * args.intermediate_size, args.hidden_size),
            (args.hidden_size, args.intermediate_size)]


def best_of(calls: list[Callable[[], torch.Tensor]], rounds: int) -> float:
    """ms of the best of `rounds` passes over `calls`, one after the other."""
    for call in calls:  # the first call builds oneDNN's primitive for this batch size
        call()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--batches", default="1,8,32,48,64,256")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gemm.json")
    opts = parser.parse_args()
    dtype = getattr(torch, opts.dtype)
    with_onednn = onednn_available(dtype)  # bf16 needs avx512bw/vl/dq or avx_ne_convert
    if not with_onednn:
        print(f"oneDNN has no {opts.dtype} linear on this CPU: F.linear and ours only")
    args = ModelArgs.from_model_dir(opts.model)
    gen = torch.Generator().manual_seed(0)
    plain = [torch.randn(n, k, generator=gen).to(dtype) * k**-0.5
             for _ in range(args.num_layers) for n, k in shapes_of(args)]
    plain.append(torch.randn(args.vocab_size, args.hidden_size, generator=gen).to(dtype))
    packed = [reorder_for_onednn(w) for w in plain] if with_onednn else None
    flop_per_row = sum(2 * w.shape[0] * w.shape[1] for w in plain)
    x = torch.randn(5, args.hidden_size, generator=gen).to(dtype)
    max_diff = None if packed is None else (
        onednn_linear(x, packed[0]) - F.linear(x, plain[0])).abs().max().item()
    ours = ([gemm_cpu.pack(w) for w in plain]
            if gemm_cpu.load() else None)
    native_diff = None if ours is None else (
        gemm_cpu.linear(x, ours[0], None, plain[0].shape[0]) - F.linear(x, plain[0])
    ).abs().max().item()

    rows: list[dict[str, Any]] = []
    for batch in (int(b) for b in opts.batches.split(",")):
        xs = {k: torch.randn(batch, k, generator=gen).to(dtype)
              for k in {w.shape[1] for w in plain}}
        paths: dict[str, list[Callable[[], torch.Tensor]]] = {
            "f_linear": [functools.partial(F.linear, xs[w.shape[1]], w) for w in plain],
        }
        if packed is not None:
            paths["onednn"] = [functools.partial(onednn_linear, xs[w.shape[1]], p)
                               for w, p in zip(plain, packed, strict=True)]
        if ours is not None:
            paths["native"] = [functools.partial(gemm_cpu.linear, xs[w.shape[1]], p, None,
                                                 w.shape[0])
                               for w, p in zip(plain, ours, strict=True)]
            # One layer's packed weights stand in for every layer's, so they stay in L3; the
            # lm_head (one of a kind, far past L3) streams in both paths.
            one = {tuple(w.shape): p for w, p in zip(plain[:-1], ours[:-1], strict=True)}
            paths["native_cached"] = [
                functools.partial(gemm_cpu.linear, xs[w.shape[1]], one.get(tuple(w.shape), p),
                                  None, w.shape[0])
                for w, p in zip(plain, ours, strict=True)]
        if dtype == torch.float32 and torch.backends.mkl.is_available():
            paths["mkl_packed"] = [
                functools.partial(torch.ops.mkl._mkl_linear, xs[w.shape[1]],
                                  torch.ops.mkl._mkl_reorder_linear_weight(w, batch), w, None,
                                  batch)
                for w in plain]
        ms = {name: float("inf") for name in paths}
        for _ in range(2):  # interleaved: each path's best over both turns
            for name, calls in paths.items():
                ms[name] = min(ms[name], best_of(calls, opts.rounds))
        row = {"batch": batch, "ms": ms,
               "gflops": {n: flop_per_row * batch / (t * 1e6) for n, t in ms.items()}}
        ratios = []
        if "onednn" in ms:
            row["onednn_speedup"] = ms["f_linear"] / ms["onednn"]
            ratios.append(f"oneDNN {row['onednn_speedup']:.2f}x F.linear")
        if "native" in ms:
            row["native_speedup"] = ms["f_linear"] / ms["native"]
            ratios.append(f"ours {row['native_speedup']:.2f}x F.linear")
        if "native" in ms and "onednn" in ms:
            row["native_vs_onednn"] = ms["onednn"] / ms["native"]
            ratios.append(f"ours {row['native_vs_onednn']:.2f}x oneDNN")
        if "native_cached" in ms:
            row["stream_cost"] = ms["native"] / ms["native_cached"]
            ratios.append(f"streamed / cached weights {row['stream_cost']:.2f}")
        rows.append(row)
        cells = "  ".join(f"{n} {t:7.1f} ms ({row['gflops'][n]:4.0f} GFLOPS)"
                          for n, t in ms.items())
        print(f"batch {batch:4d}: {cells}  {', '.join(ratios)}", flush=True)
    report = {"model": opts.model.name, "dtype": opts.dtype,
              "threads": torch.get_num_threads(), "weights_mb": sum(
                  w.numel() * w.element_size() for w in plain) / 1e6,
              "onednn_max_abs_diff_vs_f_linear": max_diff,
              "native_max_abs_diff_vs_f_linear": native_diff, "rows": rows}
    if max_diff is not None:
        print(f"oneDNN - F.linear, largest difference on one projection: {max_diff:.2e}")
    if native_diff is not None:
        print(f"ours - F.linear, largest difference on one projection: {native_diff:.2e}")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
