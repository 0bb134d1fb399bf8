"""Multi-LoRA kernel benchmark: one batch, many adapters, methods timed side by side.

    .venv/bin/python bench/kernels.py                # CPU, writes bench/results/kernels_cpu.json
    .venv/bin/python bench/kernels.py --device cuda  # GPU, writes bench/results/kernels_gpu.json

CPU (float32, in=out=4096 (`--features`), r=16, 256 tokens round-robin over 1..64 adapters):
  torch_path  kernels.add_lora on CPU (tokens grouped by slot, one matmul pair per segment)
  loop        a loop over adapters: boolean mask, gather the adapter's tokens, two matmuls
  peft_mask   PEFT-style: every adapter runs over the whole batch, the result masked to its
              tokens (the cost of not grouping)
Methods run interleaved in rounds and report the median, so background load hits all alike;
every method's output is checked against the torch path before timing. See
bench/kernels_gpu.py for the GPU mode.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import kernels

ROOT = Path(__file__).resolve().parents[1]

RANK, NUM_TOKENS = 16, 256


def make_problem(num_adapters: int, features: int = 4096, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(1, num_adapters, RANK, features, generator=g) / features**0.5
    lora_b = torch.randn(1, num_adapters, features, RANK, generator=g) / RANK**0.5
    token_to_slot = (torch.arange(NUM_TOKENS) % num_adapters).to(torch.int32)
    return dict(
        x=torch.randn(NUM_TOKENS, features, generator=g),  # [num_tokens, in]
        y=torch.zeros(NUM_TOKENS, features),  # [num_tokens, out]
        lora_a=lora_a,  # [1, num_adapters, r, in]
        lora_b=lora_b,  # [1, num_adapters, out, r]
        scales=torch.full((num_adapters,), 2.0),
        token_to_slot=token_to_slot,  # [num_tokens]
    )


def torch_path(p: dict, meta: kernels.LoraMeta) -> torch.Tensor:
    y = p["y"].clone()
    kernels.add_lora(y, p["x"], p["lora_a"], p["lora_b"], p["scales"], meta)
    return y


def loop_over_adapters(p: dict) -> torch.Tensor:
    y = p["y"].clone()
    for s in range(p["lora_a"].shape[1]):
        rows = (p["token_to_slot"] == s).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        h = (p["x"][rows] @ p["lora_a"][0, s].T) * p["scales"][s]
        y[rows] += h @ p["lora_b"][0, s].T
    return y


def peft_masking(p: dict) -> torch.Tensor:
    y = p["y"].clone()
    for s in range(p["lora_a"].shape[1]):
        mask = (p["token_to_slot"] == s).to(y.dtype)[:, None]
        y += mask * ((p["x"] @ p["lora_a"][0, s].T) * p["scales"][s] @ p["lora_b"][0, s].T)
    return y


def time_side_by_side(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median (and `<name>_min`) seconds per call, the methods interleaved round by round."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()} | {
        f"{name}_min": min(v) for name, v in samples.items()
    }


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed buffers of a few MB instead of unmapping them.

    By default each 4 MB temporary may come from a fresh mmap and fault in page by page, and
    whether it does depends on the order of earlier frees (glibc's sliding threshold), which
    made the same method vary 2-3x from one process to the next. Applies to every method.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 256 << 20) and
                libc.mallopt(m_trim_threshold, 512 << 20))  # fmt: skip


def run_cpu(adapter_counts: list[int], rounds: int, threads: int, features: int) -> dict:
    torch.set_num_threads(threads)
    malloc_tuned = keep_freed_memory()
    os.environ.pop("TRITON_INTERPRET", None)  # the torch path, not the interpreter
    rows = []
    print(f"{'adapters':>8} {'torch_path ms':>14} {'loop ms':>9} {'peft_mask ms':>13} "
          f"{'loop/torch':>11} {'peft/torch':>11} {'build_meta ms':>14}")  # fmt: skip
    for n in adapter_counts:
        p = make_problem(n, features)
        meta = kernels.build_meta(p["token_to_slot"], n)
        expected = torch_path(p, meta)
        for other in (loop_over_adapters(p), peft_masking(p)):
            torch.testing.assert_close(other, expected, atol=1e-3, rtol=1e-3)
        t = time_side_by_side(
            {
                # A fresh meta per call, as each forward step builds one; its host
                # segments are then shared by every layer, so build_meta is timed apart.
                "torch_path": lambda p=p, n=n: torch_path(
                    p, kernels.build_meta(p["token_to_slot"], n)
                ),
                "loop": lambda p=p: loop_over_adapters(p),
                "peft_mask": lambda p=p: peft_masking(p),
                "build_meta": lambda p=p, n=n: kernels.build_meta(p["token_to_slot"], n),
            },
            rounds,
        )  # fmt: skip
        row = dict(
            adapters=n,
            torch_path_ms=t["torch_path"] * 1e3,
            loop_ms=t["loop"] * 1e3,
            peft_mask_ms=t["peft_mask"] * 1e3,
            build_meta_ms=t["build_meta"] * 1e3,
            torch_path_min_ms=t["torch_path_min"] * 1e3,
            loop_min_ms=t["loop_min"] * 1e3,
            peft_mask_min_ms=t["peft_mask_min"] * 1e3,
            loop_over_torch=t["loop"] / t["torch_path"],
            peft_over_torch=t["peft_mask"] / t["torch_path"],
        )
        rows.append(row)
        print(f"{n:>8} {row['torch_path_ms']:>14.2f} {row['loop_ms']:>9.2f} "
              f"{row['peft_mask_ms']:>13.2f} {row['loop_over_torch']:>10.2f}x "
              f"{row['peft_over_torch']:>10.2f}x {row['build_meta_ms']:>14.3f}",
              flush=True)  # fmt: skip
    return dict(
        device="cpu",
        dtype="float32",
        in_features=features,
        out_features=features,
        rank=RANK,
        num_tokens=NUM_TOKENS,
        rounds=rounds,
        threads=threads,
        malloc_keeps_freed_memory=malloc_tuned,
        torch=torch.__version__,
        machine=platform.machine(),
        processor=platform.processor() or platform.machine(),
        rows=rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--adapters", default="1,2,4,8,16,32,64",
                        help="CPU mode: comma-separated adapter counts")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=7, help="CPU mode: timed rounds")
    parser.add_argument("--threads", type=int, default=1, help="CPU mode: torch threads")
    parser.add_argument("--features", type=int, default=4096, help="CPU mode: in = out")
    parser.add_argument("--quick", action="store_true", help="GPU mode: a reduced matrix")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="GPU mode: stop starting new configs after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("bench.lora_kernels --device cuda: CUDA is not available here; nothing measured.",
                  file=sys.stderr)  # fmt: skip
            return 0
        from bench.lora_kernels_gpu import run_gpu  # beside this file

        result = run_gpu(quick=args.quick, budget_s=args.budget_s)
        default_out = ROOT / "bench" / "results" / "kernels_gpu.json"
    else:
        counts = [int(c) for c in args.adapters.split(",") if c.strip()]
        result = run_cpu(counts, args.rounds, args.threads, args.features)
        default_out = ROOT / "bench" / "results" / "kernels_cpu.json"
    out = args.out or default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
