"""The decode step's roofline on this machine: compute time, memory time, and the older
compute-only figure, measured here and printed beside the step (bench/step_profile.py).

    compute_ms  the step's GEMM FLOPs (every projection and the lm_head at this batch) over
                the best GFLOPS any GEMM here reaches on one of the step's shapes in a tight
                loop (one small weight stays in cache, so this is the arithmetic alone; the
                best of 5 timings): of F.linear (MKL), of oneDNN over a reordered weight
                (runtime/model/linear.py) and of our kernel (gemm_cpu.py), each printed.
                Until issue 13's second round this was *the* roof ("roof_ms_float32"); it
                is still printed under that name. Until the third it
                measured F.linear alone, which on the development VM's AMD CPU reaches a third
                of what oneDNN does ("roof_ms_float32_f_linear").
    memory_ms   the bytes a step must read once: every weight matrix the GEMMs stream (a
                decode step at batch 32 reuses each weight for only 32 rows, so the ~540 MB
                of SmolLM2's fp32 weights come from memory, not cache), the LoRA packs, and
                the KV cache of the batch's contexts; over the read bandwidth measured here
                (the best of a few sums over a buffer far larger than the caches).
    roof_ms     max(compute_ms, memory_ms): no step can beat either.
    gemm_sequence_ms  the step's base GEMMs run back to back over their distinct weights,
                through the engine's own GEMM path, as the step runs them (what the GEMMs
                alone reach, not a bound).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from runtime.model import gemm_cpu
from runtime.model.linear import onednn_available, onednn_linear, reorder_for_onednn

STREAM_BYTES = 512 * 1024 * 1024  # far past any L3: a sum over it runs at memory speed


def read_bandwidth(rounds: int = 5) -> float:
    """Bytes per second of a read-only pass (a sum) over a buffer of STREAM_BYTES."""
    buf = torch.ones(STREAM_BYTES // 4, dtype=torch.float32)
    buf.sum()  # fault the pages in before timing
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return STREAM_BYTES / best


def _weights(engine) -> list[Any]:
    """The step's projections (runtime.model.linear.Linear) in the order a step runs them."""
    out = []
    for layer in engine.model.layers:
        out += [layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj]
    return [*out, engine.model.lm_head]


def _gemm_paths(dtype: torch.dtype) -> dict[str, Any]:
    """name -> (prepare(weight) -> w, run(x, w)) for every GEMM this torch and CPU offer for
    `dtype` (oneDNN's bf16 needs avx512bw/vl/dq or avx_ne_convert: runtime/model/linear.py)."""
    paths: dict[str, Any] = {"f_linear": (lambda w: w, F.linear)}
    if onednn_available(dtype):
        paths["onednn"] = (reorder_for_onednn, onednn_linear)
    if gemm_cpu.load():  # float32 and bfloat16
        paths["native"] = (lambda w: (gemm_cpu.pack(w), w.shape[0]),
                           lambda x, pw: gemm_cpu.linear(x, pw[0], None, pw[1]))
    return paths


def best_gflops(shape: tuple[int, int], batch: int, dtype: torch.dtype, prepare, run,
                rounds: int, repeats: int = 5) -> float:
    """The GFLOPS of the best of `repeats` timings of `rounds` calls each: the rate the GEMM
    reaches, where one mean would also hold whatever else this shared VM ran meanwhile."""
    out_features, in_features = shape
    wt = prepare(torch.randn(out_features, in_features).to(dtype))
    x = torch.randn(batch, in_features).to(dtype)
    for _ in range(3):
        run(x, wt)
    dt = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(rounds):
            run(x, wt)
        dt = min(dt, (time.perf_counter() - start) / rounds)
    return 2 * batch * out_features * in_features / dt / 1e9


def _lora_bytes(engine) -> int:
    lora = getattr(engine, "lora", None)
    packs = getattr(lora, "_packs", {}) if lora is not None else {}
    return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
               for a, b in packs.values())


def kv_bytes(engine, contexts: list[int]) -> int:
    """The K and V rows a step's attention reads once: every context token, every layer."""
    kv = engine.kv_cache
    per_token = 2 * kv.k.shape[0] * kv.k.shape[2] * kv.k.shape[3] * kv.k.element_size()
    return per_token * sum(contexts)


def roofline(engine, batch: int, contexts: list[int], rounds: int = 20) -> dict[str, Any]:
    """The step's roofline at `batch` with these sequence `contexts` (tokens each)."""
    layer = engine.model.layers[0]
    shapes = [tuple(p.shape) for p in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj,
                                       layer.down_proj, engine.model.lm_head)]
    weights = _weights(engine)
    flops = sum(2 * batch * w.shape[0] * w.shape[1] for w in weights)
    out: dict[str, Any] = {"step_gemm_gflop": flops / 1e9}
    for dtype in {torch.float32, engine.dtype}:
        name = str(dtype).removeprefix("torch.")
        best = 0.0
        for path, (prepare, run) in _gemm_paths(dtype).items():
            gflops = max(best_gflops(shape, batch, dtype, prepare, run, rounds)
                         for shape in shapes)
            out[f"gflops_{name}_{path}"] = gflops
            out[f"roof_ms_{name}_{path}"] = flops / (gflops * 1e9) * 1e3
            best = max(best, gflops)
        out[f"gflops_{name}"] = best
        out[f"roof_ms_{name}"] = flops / (best * 1e9) * 1e3  # compute-only, the old roof
    weight_bytes = sum(w.nbytes for w in weights)
    bytes_read = weight_bytes + _lora_bytes(engine) + kv_bytes(engine, contexts)
    bandwidth = read_bandwidth()
    compute_ms = out[f"roof_ms_{str(engine.dtype).removeprefix('torch.')}"]
    memory_ms = bytes_read / bandwidth * 1e3
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=engine.dtype) for w in weights}
    seq_best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for w in weights:
            w(xs[w.shape[1]])
        seq_best = min(seq_best, time.perf_counter() - start)
    out |= {"weight_mb": weight_bytes / 1e6, "bytes_read_mb": bytes_read / 1e6,
            "read_gb_s": bandwidth / 1e9, "compute_ms": compute_ms, "memory_ms": memory_ms,
            "roof_ms": max(compute_ms, memory_ms), "gemm_sequence_ms": seq_best * 1e3}
    return out
