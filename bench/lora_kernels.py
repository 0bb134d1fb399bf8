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

    .venv/bin/python -m bench.lora_kernels --dense   # writes bench/results/kernels_dense_cpu.json

`--dense`: `kernels.add_lora_dense` on SmolLM2-135M's four projections as a decode step at
`--tokens` (32) packs them for bench/step_profile.py's two adapters (r8 on all seven modules,
r16 on q and v; tokens round robin base / adapter 1 / adapter 2), its torch form (three
calls) against the native op (kernels/csrc/lora_cpu.cpp), side by side; `step_ms` is the
four projections times the model's 30 layers.
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


# SmolLM2-135M: projection -> (in, slice sizes); step_profile's adapters: (rank, targets).
_SMOLLM2 = {"qkv_proj": (576, [576, 192, 192]), "o_proj": (576, [576]),
            "gate_up_proj": (576, [1536, 1536]), "down_proj": (1536, [576])}
_SMOLLM2_LAYERS = 30
_STEP_ADAPTERS = ((8, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}), (16, {"qkv_proj"}))


def dense_problem(projection: str, num_tokens: int, seed: int = 0) -> dict:
    """One layer's packs and mask for `projection`, as runtime/lora/layers.py builds them."""
    in_features, sizes = _SMOLLM2[projection]
    g = torch.Generator().manual_seed(seed)
    slots = [s for s, (_, targets) in enumerate(_STEP_ADAPTERS) if projection in targets]
    rank = max(_STEP_ADAPTERS[s][0] for s in slots)
    num_slots, num_slices = len(_STEP_ADAPTERS), len(sizes)
    lora_a = torch.zeros(1, num_slices, num_slots, rank, in_features)
    lora_b = torch.zeros(1, num_slices, num_slots, max(sizes), rank)
    for s in slots:
        r = _STEP_ADAPTERS[s][0]
        lora_a[0, :, s, :r] = torch.randn(num_slices, r, in_features, generator=g) / 24
        lora_b[0, :, s, :, :r] = torch.randn(num_slices, max(sizes), r, generator=g) / 4
    a_pack, b_pack = kernels.pack_dense(lora_a, lora_b, slots, rank, sizes)
    # Round robin base / adapter 1 / adapter 2; an adapter not targeting it: base here.
    t2s = [(i % 3) - 1 for i in range(num_tokens)]
    t2s = [s if s in slots else -1 for s in t2s]
    mask = kernels.dense_mask(t2s, slots, rank, [2.0] * num_slots, num_slices)
    return dict(x=torch.randn(num_tokens, in_features, generator=g),
                y=torch.randn(num_tokens, sum(sizes), generator=g), a_pack=a_pack[0],
                b_pack=b_pack[0], mask=mask, slice_sizes=sizes, width=len(slots) * rank)


def run_dense(rounds: int, threads: int, num_tokens: int) -> dict:
    from kernels import torch_lora

    torch.set_num_threads(threads)
    op = torch_lora._native_op()
    if op is None:
        raise SystemExit("bench.lora_kernels --dense: the native op did not build (see the log)")

    def torch_form(p: dict) -> None:  # add_lora_dense's fallback, as it ran before the op
        torch_lora.add_lora_dense_torch(p["y"], p["x"], p["a_pack"], p["b_pack"], p["mask"])

    def native(p: dict) -> None:
        op(p["y"], p["x"], p["a_pack"], p["b_pack"], p["mask"], p["slice_sizes"])

    def public(p: dict) -> None:  # the op behind add_lora_dense's checks, as layers.py calls it
        kernels.add_lora_dense(p["y"], p["x"], p["a_pack"], p["b_pack"], p["mask"],
                               p["slice_sizes"])

    rows = []
    print(f"{'projection':>13} {'S':>2} {'W':>4} {'torch us':>9} {'native us':>10} "
          f"{'ratio':>6} {'add_lora_dense us':>18}")
    for projection in _SMOLLM2:
        p = dense_problem(projection, num_tokens)
        want, got = dict(p, y=p["y"].clone()), dict(p, y=p["y"].clone())
        torch_form(want)
        native(got)
        torch.testing.assert_close(got["y"], want["y"], atol=1e-4, rtol=1e-5)
        # y grows by the LoRA term every call; it stays finite over these few hundred calls.
        t = time_side_by_side({"torch": lambda p=p: torch_form(p), "native": lambda p=p: native(p),
                               "public": lambda p=p: public(p)}, rounds)
        row = dict(projection=projection, num_slices=len(p["slice_sizes"]), width=p["width"],
                   torch_us=t["torch"] * 1e6, native_us=t["native"] * 1e6,
                   torch_min_us=t["torch_min"] * 1e6, native_min_us=t["native_min"] * 1e6,
                   add_lora_dense_us=t["public"] * 1e6, torch_over_native=t["torch"] / t["native"])
        rows.append(row)
        print(f"{projection:>13} {row['num_slices']:>2} {row['width']:>4} {row['torch_us']:>9.1f} "
              f"{row['native_us']:>10.1f} {row['torch_over_native']:>5.1f}x "
              f"{row['add_lora_dense_us']:>18.1f}", flush=True)
    step = {k: sum(r[f"{k}_us"] for r in rows) * _SMOLLM2_LAYERS / 1e3
            for k in ("torch", "native", "add_lora_dense")}
    print(f"per step ({_SMOLLM2_LAYERS} layers): torch {step['torch']:.2f} ms, native "
          f"{step['native']:.2f} ms, add_lora_dense {step['add_lora_dense']:.2f} ms")
    return dict(device="cpu", dtype="float32", model="SmolLM2-135M", num_tokens=num_tokens,
                rounds=rounds, threads=threads, torch=torch.__version__,
                machine=platform.machine(), rows=rows, step_ms_torch=step["torch"],
                step_ms_native=step["native"], step_ms_add_lora_dense=step["add_lora_dense"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--adapters", default="1,2,4,8,16,32,64",
                        help="CPU mode: comma-separated adapter counts")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=None,
                        help="CPU mode: timed rounds (default 7; 200 with --dense)")
    parser.add_argument("--threads", type=int, default=1, help="CPU mode: torch threads")
    parser.add_argument("--features", type=int, default=4096, help="CPU mode: in = out")
    parser.add_argument("--quick", action="store_true", help="GPU mode: a reduced matrix")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="GPU mode: stop starting new configs after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    parser.add_argument("--dense", action="store_true",
                        help="CPU: add_lora_dense's torch form against the native op")
    parser.add_argument("--tokens", type=int, default=32, help="--dense: tokens in the step")
    args = parser.parse_args(argv)
    if args.dense:
        result = run_dense(args.rounds or 200, args.threads, args.tokens)
        default_out = ROOT / "bench" / "results" / "kernels_dense_cpu.json"
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            print("bench.lora_kernels --device cuda: CUDA is not available here; nothing measured.",
                  file=sys.stderr)  # fmt: skip
            return 0
        from bench.lora_kernels_gpu import run_gpu  # beside this file

        result = run_gpu(quick=args.quick, budget_s=args.budget_s)
        default_out = ROOT / "bench" / "results" / "kernels_gpu.json"
    else:
        counts = [int(c) for c in args.adapters.split(",") if c.strip()]
        result = run_cpu(counts, args.rounds or 7, args.threads, args.features)
        default_out = ROOT / "bench" / "results" / "kernels_cpu.json"
    out = args.out or default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
