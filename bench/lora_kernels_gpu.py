"""GPU mode of bench/kernels.py (`--device cuda`): the Triton kernels against torch baselines.

One LoRA'd projection in bfloat16, in=4096 -> out in {4096, 14336}, r in {8, 16, 64}, a slot
table of 64 adapters; decode T in {1, 16, 64, 256}, prefill T in {512, 4096}; adapter mixes
identical (one adapter), distinct (token i -> slot i % 64), uniform over 8, Zipf 1.5 over 64.
  base        y = x @ W.T alone (cuBLAS)
  triton      kernels.add_lora (shrink + expand)
  loop        a loop over the step's adapters with torch matmuls (per-adapter row indices
              prepared outside the timing, as a host that knows its batch would)
  gather_bmm  every token's A and B gathered, then two bmm (skipped past 4 GiB of gather)
Reported: overhead = t(base, then add_lora) / t(base); the byte-count bound of that ratio
(1 + LoRA bytes / base bytes: what a memory-bound kernel cannot beat); speedups of the
triton LoRA term over loop and gather_bmm. Every timing replays a CUDA graph of 20 calls
(eager if capture fails), so CPU launch cost is left out, as a graph-captured decode step
would leave it out. Targets at decode, 64 distinct adapters, r <= 16: overhead <= 1.2x and
>= 10x over the loop. Configs run target cases first and stop at `budget_s`.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch

import kernels

IN_FEATURES, NUM_SLOTS, ITERS = 4096, 64, 20
DECODE_T, PREFILL_T = (1, 16, 64, 256), (512, 4096)
MIXES = ("distinct", "zipf1.5", "uniform8", "identical")
GATHER_LIMIT_BYTES = 4 << 30


def token_slots(mix: str, num_tokens: int, g: torch.Generator) -> torch.Tensor:  # [T] int32
    if mix == "identical":
        return torch.zeros(num_tokens, dtype=torch.int32)
    if mix == "distinct":
        return (torch.arange(num_tokens) % NUM_SLOTS).to(torch.int32)
    if mix == "uniform8":
        return torch.randint(0, 8, (num_tokens,), generator=g, dtype=torch.int32)
    weights = torch.arange(1, NUM_SLOTS + 1, dtype=torch.float64) ** -1.5
    return torch.multinomial(weights, num_tokens, replacement=True, generator=g).to(torch.int32)


def cuda_time(fn: Callable[[], object]) -> tuple[float, str]:
    """Milliseconds per call: median of 5 replays of a graph of ITERS calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm up (and compile) outside any capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(ITERS):
                fn()
        run, mode = graph.replay, "graph"
    except RuntimeError:
        torch.cuda.synchronize()

        def run() -> None:
            for _ in range(ITERS):
                fn()

        mode = "eager"
    run()
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / ITERS)
    return statistics.median(samples), mode


def bench_one(num_tokens: int, mix: str, out: int, rank: int, device: str = "cuda") -> dict:
    g = torch.Generator().manual_seed(num_tokens * 7 + rank)
    dev, bf16 = device, torch.bfloat16
    gd = torch.Generator(device=dev).manual_seed(rank)  # weights made on the GPU: fast

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gd, device=dev) * std).to(bf16)

    t2s = token_slots(mix, num_tokens, g)
    x = randn(num_tokens, IN_FEATURES, std=1.0)  # [T, in]
    w = randn(out, IN_FEATURES, std=IN_FEATURES**-0.5)  # [out, in]
    lora_a = randn(1, NUM_SLOTS, rank, IN_FEATURES, std=IN_FEATURES**-0.5)  # [1, slots, r, in]
    lora_b = randn(1, NUM_SLOTS, out, rank, std=rank**-0.5)  # [1, slots, out, r]
    scales = torch.full((NUM_SLOTS,), 2.0, device=dev)
    meta = kernels.build_meta(t2s.to(dev), NUM_SLOTS)
    y = torch.zeros(num_tokens, out, device=dev, dtype=bf16)  # [T, out]
    active = sorted(set(t2s.tolist()))
    rows = {s: (t2s == s).nonzero().squeeze(1).to(dev) for s in active}
    slots = t2s.to(dev).long()

    def base() -> None:
        torch.mm(x, w.t(), out=y)

    def triton_lora() -> None:
        kernels.add_lora(y, x, lora_a, lora_b, scales, meta)

    def base_and_triton() -> None:
        base()
        triton_lora()

    def loop() -> None:
        for s in active:
            h = (x.index_select(0, rows[s]) @ lora_a[0, s].t()) * 2.0
            y.index_add_(0, rows[s], h @ lora_b[0, s].t())

    def gather_bmm() -> None:
        h = torch.bmm(lora_a[0, slots], x.unsqueeze(2)) * 2.0  # [T, r, 1]
        y.add_(torch.bmm(lora_b[0, slots], h).squeeze(2))

    # Correctness first: the triton term against the loop's, from y = 0.
    y.zero_()
    triton_lora()
    expected = y.clone()
    y.zero_()
    loop()
    max_err = float((expected.float() - y.float()).abs().max())
    row: dict = dict(num_tokens=num_tokens, mix=mix, out=out, rank=rank,
                     num_adapters=len(active), max_abs_err_vs_loop=max_err)  # fmt: skip
    for name, fn in (("base", base), ("triton", triton_lora), ("base_triton", base_and_triton),
                     ("loop", loop)):  # fmt: skip
        row[f"{name}_ms"], row[f"{name}_mode"] = cuda_time(fn)
    gather_bytes = num_tokens * rank * (IN_FEATURES + out) * 2
    if gather_bytes <= GATHER_LIMIT_BYTES:
        row["gather_bmm_ms"], row["gather_bmm_mode"] = cuda_time(gather_bmm)
    base_bytes = (IN_FEATURES * out + num_tokens * (IN_FEATURES + out)) * 2
    lora_bytes = (len(active) * rank * (IN_FEATURES + out) + num_tokens * (IN_FEATURES + out)) * 2
    row["overhead"] = row["base_triton_ms"] / row["base_ms"]
    row["overhead_bound"] = 1 + lora_bytes / base_bytes
    row["speedup_vs_loop"] = row["loop_ms"] / row["triton_ms"]
    if "gather_bmm_ms" in row:
        row["speedup_vs_gather_bmm"] = row["gather_bmm_ms"] / row["triton_ms"]
    return row


def configs(quick: bool) -> list[tuple[int, str, int, int]]:
    tokens = (1, 64, 4096) if quick else DECODE_T + PREFILL_T
    mixes = ("distinct", "zipf1.5") if quick else MIXES
    ranks = (16,) if quick else (8, 16, 64)
    all_ = list(itertools.product(tokens, mixes, (4096, 14336), ranks))
    # The target cases (decode, distinct, r <= 16) first, so a cut budget still has them.
    return sorted(all_, key=lambda c: (not (c[0] in DECODE_T and c[1] == "distinct"
                                            and c[3] <= 16), c))  # fmt: skip


def run_gpu(quick: bool = False, budget_s: float = 200.0) -> dict:
    todo = configs(quick)
    started, rows, skipped = time.monotonic(), [], []
    print(f"{'T':>5} {'mix':>9} {'out':>6} {'r':>3} {'n_ad':>4} {'base ms':>8} {'lora ms':>8} "
          f"{'ovh':>6} {'bound':>6} {'vs loop':>8} {'vs gbmm':>8} {'err':>7}")  # fmt: skip
    for cfg in todo:
        if time.monotonic() - started > budget_s:
            skipped.append(cfg)
            continue
        try:
            row = bench_one(*cfg)
        except Exception as exc:  # one failed config must not lose the rest
            rows.append(dict(zip(("num_tokens", "mix", "out", "rank"), cfg, strict=True),
                             error=repr(exc)))  # fmt: skip
            print(f"{cfg}: {exc!r}", flush=True)
            continue
        rows.append(row)
        gbmm = row.get("speedup_vs_gather_bmm")
        gbmm = f"{gbmm:7.1f}x" if gbmm is not None else "       -"
        print(f"{cfg[0]:>5} {cfg[1]:>9} {cfg[2]:>6} {cfg[3]:>3} {row['num_adapters']:>4} "
              f"{row['base_ms']:>8.4f} {row['triton_ms']:>8.4f} {row['overhead']:>5.2f}x "
              f"{row['overhead_bound']:>5.2f}x {row['speedup_vs_loop']:>7.1f}x {gbmm} "
              f"{row['max_abs_err_vs_loop']:>7.3f}", flush=True)  # fmt: skip
    targets = [
        r for r in rows
        if "overhead" in r and r["num_tokens"] in DECODE_T and r["mix"] == "distinct"
        and r["rank"] <= 16 and r["num_adapters"] == 64
    ]  # fmt: skip
    for r in targets:
        met = r["overhead"] <= 1.2 and r["speedup_vs_loop"] >= 10
        print(f"target T={r['num_tokens']} out={r['out']} r={r['rank']}: overhead "
              f"{r['overhead']:.2f}x (<= 1.2), vs loop {r['speedup_vs_loop']:.1f}x (>= 10): "
              f"{'met' if met else 'missed'}")  # fmt: skip
    return dict(
        device=torch.cuda.get_device_name(), dtype="bfloat16", in_features=IN_FEATURES,
        num_slots=NUM_SLOTS, iters_per_graph=ITERS, torch=torch.__version__,
        triton=__import__("triton").__version__, quick=quick, rows=rows,
        skipped_for_budget=[list(c) for c in skipped],
    )  # fmt: skip
