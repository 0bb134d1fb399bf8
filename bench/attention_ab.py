"""The CPU paged-attention kernel against the gather path it replaced, side by side.

    .venv/bin/python -m bench.attention_ab            # -> bench/results/attention_ab.json
    .venv/bin/python -m bench.attention_ab --quick    # one round, contexts 16 and 512

Each figure is `bench.step_profile --attention ab` in a fresh process, in which the two
variants take turns step by step (`engine.paged_kernel` is read per step), so that the load
of a shared machine hits both alike; `--rounds` processes, the best of each variant kept.
On SmolLM2-135M, fp32, base model + two adapters round robin:
  step       the decode step at batch 32 and a short prompt (24 tokens), by part
  contexts   the decode step at batch 8 and prompts of 16, 512 and 2048 tokens: how much
             the step grows over the shortest against how much the attention FLOPs grow
  op         paged_attention() alone, one layer of SmolLM2's shapes on random pools, one
             thread, in this process: decode batches and prefill chunks over cached context
             (what PAGED_PREFILL_MAX in runtime/model/attention.py rests on)
  stream     the kernel alone over all layers, each on its own pools, on one thread and on
             all: K/V read per second against the machine's read bandwidth (the memory
             floor), and what the kernel's thread split buys (`--stream-only`: this alone)
"gather" is `RuntimeConfig(attention="gather")`: each context gathered out of the paged pool
per layer, then SDPA; "kernel" reads the block tables directly (runtime/model/csrc/).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.step_profile import DEFAULT_MODEL, ROOT, make_adapters

VARIANTS = ("gather", "kernel")


def side_by_side(model: Path, adapters: Path, rounds: int, batch: int, prompt_len: int,
                 steps: int) -> dict[str, dict[str, Any]]:
    """`rounds` fresh processes of `bench.step_profile --attention ab` (the two variants
    taking turns step by step inside each); the best round of each variant."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        out = subprocess.run(
            [sys.executable, "-m", "bench.step_profile", "--model", str(model), "--batch",
             str(batch), "--steps", str(steps), "--adapters-dir", str(adapters), "--json",
             "--attention", "ab", "--prompt-len", str(prompt_len)],
            cwd=ROOT, capture_output=True, text=True, check=True)
        pair = json.loads(out.stdout.strip().splitlines()[-1])
        for name in VARIANTS:
            runs[name].append(pair[name])
    best = {k: min(v, key=lambda r: r["step_ms_median"]) for k, v in runs.items()}
    for k, v in runs.items():
        best[k]["all_step_ms_median"] = [r["step_ms_median"] for r in v]
    return best


def attention_gflop(model: Path, batch: int, context: int) -> float:
    cfg = json.loads((model / "config.json").read_text())
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 4 * batch * context * heads * dim * layers / 1e9  # QK^T and PV, 2 FLOPs a MAC


def time_op(fn, *args: Any, rounds: int = 20) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def op_figures(model: Path) -> list[dict[str, Any]]:
    """One layer's attention, kernel against gather, best of 20, one thread."""
    import torch

    from runtime.model.attention import build_metadata, paged_attention

    cfg = json.loads((model / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    block, gen, rows = 16, torch.Generator().manual_seed(0), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = [("decode", b, c, 1) for b, c in ((32, 40), (32, 512), (8, 2048), (32, 2048))]
        cases += [("chunk", 1, c, n) for c in (512, 2048) for n in (4, 8, 16, 64)]
        for kind, batch, context, new in cases:
            per_seq = (context + block - 1) // block
            k = torch.randn(batch * per_seq * block, kv_heads, dim, generator=gen)
            v = torch.randn(batch * per_seq * block, kv_heads, dim, generator=gen)
            order = torch.randperm(batch * per_seq, generator=gen).tolist()
            seqs = [(order[i * per_seq:(i + 1) * per_seq], context - new, new)
                    for i in range(batch)]
            q = torch.randn(batch * new, heads, dim, generator=gen)
            row: dict[str, Any] = {"kind": kind, "batch": batch, "context": context,
                                   "tokens": new}
            for name, paged in (("gather", False), ("kernel", True)):
                # Every chunk to the kernel here, whatever PAGED_PREFILL_MAX says.
                meta = build_metadata(seqs, block, "cpu", paged=paged, paged_prefill_max=1 << 30)
                row[f"{name}_ms"] = time_op(paged_attention, q, k, v, meta, 0.125)
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def median_step_ms(op: Any, q: Any, k: list[Any], v: list[Any], tables: Any, index: Any,
                   lens: Any, out: Any, block: int, scale: float, rounds: int = 9) -> float:
    """Median over `rounds` of the op run once per layer's pools (after one warm-up)."""
    def step() -> None:
        for k_layer, v_layer in zip(k, v, strict=True):
            op(q, k_layer, v_layer, tables, index, index, lens, out, block, scale)

    step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[rounds // 2] * 1e3


def stream_figures(model: Path) -> list[dict[str, Any]]:
    """The kernel alone over one step's worth of layers, each on its own pools (so, unlike
    `op`, the K/V come from memory, not L3), all threads: K/V bytes read per second against
    the machine's read bandwidth (bench/roofline.py), the floor no decode step can beat; on
    one thread and on all of them, the same pools."""
    import torch

    from bench.roofline import read_bandwidth
    from runtime.model import paged_attention_cpu

    op = paged_attention_cpu.load()
    assert op is not None, "the kernel did not build"
    cfg = json.loads((model / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    layers, block, gen = cfg["num_hidden_layers"], 16, torch.Generator().manual_seed(0)
    bandwidth = read_bandwidth()
    all_threads = torch.get_num_threads()
    rows = []
    for batch, context in ((8, 512), (8, 2048), (1, 2048)):
        per_seq = (context + block - 1) // block
        pool_rows = batch * per_seq * block
        k = [torch.randn(pool_rows, kv_heads, dim, generator=gen) for _ in range(layers)]
        v = [torch.randn(pool_rows, kv_heads, dim, generator=gen) for _ in range(layers)]
        tables = torch.randperm(batch * per_seq, generator=gen).to(torch.int32)
        tables = tables.view(batch, per_seq).contiguous()
        index = torch.arange(batch, dtype=torch.int32)
        lens = torch.full((batch,), context, dtype=torch.int32)
        q = torch.randn(batch, heads, dim, generator=gen)
        out = torch.empty_like(q)
        kv_bytes = 2 * batch * context * kv_heads * dim * 4 * layers
        for threads in sorted({1, all_threads}):
            torch.set_num_threads(threads)
            ms = median_step_ms(op, q, k, v, tables, index, lens, out, block, dim**-0.5)
            rows.append({"batch": batch, "context": context, "layers": layers,
                         "threads": threads, "ms": ms, "kv_gb_per_s": kv_bytes / ms / 1e6,
                         "floor_ms": kv_bytes / bandwidth * 1e3,
                         "ms_per_gflop": ms / attention_gflop(model, batch, context)})
        torch.set_num_threads(all_threads)
    return rows


def _stream_line(r: dict[str, Any]) -> str:
    return (f"  batch {r['batch']} x context {r['context']:>4}, {r['threads']} thread(s): "
            f"{r['ms']:6.1f} ms, {r['kv_gb_per_s']:5.1f} GB/s of K/V, "
            f"{r['ms_per_gflop']:.2f} ms per GFLOP (memory floor {r['floor_ms']:.1f} ms)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/attention_ab.json")
    parser.add_argument("--stream-only", action="store_true",
                        help="only the kernel alone over a step's layers, 1 and all threads")
    args = parser.parse_args()
    if args.stream_only:
        for r in stream_figures(args.model):
            sys.stdout.write(_stream_line(r))
        return
    rounds = args.rounds or (1 if args.quick else 2)
    contexts = (16, 512) if args.quick else (16, 512, 2048)
    tmp = tempfile.TemporaryDirectory()
    adapters = Path(tmp.name)
    make_adapters(args.model, adapters)
    report: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "rounds": rounds}
    report["op"] = op_figures(args.model)
    report["stream"] = stream_figures(args.model)
    report["step"] = side_by_side(args.model, adapters, rounds, 32, 24, 12)
    report["contexts"] = {}
    for length in contexts:
        row = side_by_side(args.model, adapters, rounds, 8, length, 6)
        row["attention_gflop"] = attention_gflop(args.model, 8, length)  # type: ignore[assignment]
        report["contexts"][str(length)] = row

    out = sys.stdout.write
    out("one layer's attention alone, one thread, ms (kernel / gather):\n")
    for r in report["op"]:
        out(f"  {r['kind']:<6} batch {r['batch']:>2} x {r['tokens']:>2} token(s) over "
            f"{r['context']:>4}: gather {r['gather_ms']:7.3f}  kernel {r['kernel_ms']:7.3f}  "
            f"({r['kernel_ms'] / r['gather_ms']:.2f})\n")
    out("the kernel alone over a step's layers, each on its own pools:\n")
    for r in report["stream"]:
        out(_stream_line(r))
    s = report["step"]
    out(f"decode step, batch 32, prompt 24, ms (variants alternating per step, median step's "
        f"parts, best of {rounds} processes):\n")
    out(f"  {'part':<10} {'gather':>8} {'kernel':>8}\n")
    for part, ms in s["gather"]["parts_ms"].items():
        out(f"  {part:<10} {ms:8.1f} {s['kernel']['parts_ms'][part]:8.1f}\n")
    g, k = s["gather"]["step_ms_median"], s["kernel"]["step_ms_median"]
    out(f"  {'step':<10} {g:8.1f} {k:8.1f}   gather / kernel {g / k:.2f}x\n")
    rows = report["contexts"]
    first = rows[str(contexts[0])]
    out("decode step, batch 8, by context (ms; growth over the shortest, against the growth "
        "of the attention FLOPs):\n")
    for length in contexts[1:]:
        row = rows[str(length)]
        flops = row["attention_gflop"] / first["attention_gflop"]
        line = [f"  context {length:>5}: attention FLOPs x{flops:.0f}"]
        for name in VARIANTS:
            step, base = row[name]["step_ms_median"], first[name]["step_ms_median"]
            attn = row[name]["parts_ms"]["attention"]
            attn0 = first[name]["parts_ms"]["attention"]
            line.append(f"{name} step {step:.1f} (x{step / base:.2f}), attention {attn:.1f} "
                        f"(x{attn / attn0:.1f})")
        out("; ".join(line) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    out(f"wrote {args.out}\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
