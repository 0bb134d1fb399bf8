"""One decode step of the engine on a real checkpoint, timed by part, beside the GEMM roof.

    .venv/bin/python -m bench.step_profile [--batch 32] [--legacy] [--dtype bfloat16] [--json]
        [--attention gather] [--prompt-len 24] [--gemm onednn] [--layer-ops torch]

A batch of `--batch` requests over the base model and two adapters (round robin) decodes;
after warm-up, `--steps` steps are timed with perf_counter around each part (the CPU runs
every op synchronously, so the timers are the parts' own costs):
  base_gemm  the four projections of every layer (on CPU our kernel or oneDNN over packed
             weights, `--gemm native|onednn`; F.linear with `--gemm torch`;
             runtime/model/linear.py)
  lora       the LoRA term (`LoraManager.apply`)
  attention  paged attention, and the KV write where torch ops do it (`--layer-ops torch`)
  lm_head    the logits of the sampled rows
  sampler    `runtime.model.sampler.sample`
  python     the rest of `engine.step` (scheduling, metadata, norms, rotary, residuals; on
             CPU in float32 the norms and rotary are fused C++ calls, `--layer-ops torch`
             gives torch ops; runtime/model/fused_cpu.py)
An adapter is loaded through the runtime's own loader threads before timing. `--legacy`
reproduces the code before issue 13 in the same tree: loader threads with torch's default
thread count (a second OpenMP team) and the per-adapter LoRA loop instead of the dense form.
`--attention gather` forces the gather + SDPA decode attention instead of the CPU paged kernel
(`RuntimeConfig.attention`); `--attention ab` alternates the two step by step in one process
and reports each; `--prompt-len` sets the context the batch decodes at.

The roof (bench/roofline.py): the larger of the compute time (the step's GEMM FLOPs over the
best GFLOPS of each shape in a tight loop, the old compute-only roof, still reported as
`roof_ms_float32`) and the memory time (weights, LoRA packs and KV read once, over the read
bandwidth measured here).
`run_profile` is what bench/real_model.py calls (in a fresh process per variant, so that
one variant's thread pools cannot slow the next).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from bench.roofline import roofline

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / ".cache" / "smollm2-135m-instruct"
PARTS = ("base_gemm", "lora", "attention", "lm_head", "sampler", "python")


def make_adapters(model_dir: Path, out: Path) -> list[Any]:
    """Two PEFT adapters with seeded random weights (rank 8 on all seven modules, rank 16 on
    q and v), saved under `out`; their runtime references."""
    import hashlib

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from runtime.types import AdapterRef

    specs = (("all-r8", 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"]), ("qv-r16", 16, ["q_proj", "v_proj"]))
    refs = []
    for seed, (name, rank, targets) in enumerate(specs):
        path = out / name
        if not (path / "adapter_model.safetensors").exists():
            torch.manual_seed(seed + 1)
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            config = LoraConfig(r=rank, lora_alpha=2.0 * rank, target_modules=targets,
                                lora_dropout=0.0, init_lora_weights=False)
            get_peft_model(base, config).save_pretrained(path)
        weights = path / "adapter_model.safetensors"
        refs.append(AdapterRef.for_version(
            hashlib.sha256(weights.read_bytes()).hexdigest(), weights.resolve().as_uri(),
            rank=rank, alpha=2.0 * rank, target_modules=tuple(targets), name=name))
    return refs


def build_engine(model_dir: Path, dtype: str | None, max_running: int, max_model_len: int,
                 attention: str = "auto", kv_cache_bytes: int | None = None,
                 gemm: str = "auto", layer_ops: str = "auto"):
    from runtime.config import RuntimeConfig
    from runtime.engine import LLMEngine, resolve_dtype
    from runtime.lora.manager import build_lora_runtime
    from runtime.model.weights import ModelArgs

    config = RuntimeConfig(model_dir=model_dir, dtype=dtype, max_running=max_running,
                           max_batch_tokens=4096, max_lora_rank=16, max_gpu_adapters=4,
                           max_model_len=max_model_len, attention=attention,
                           kv_cache_bytes=kv_cache_bytes, gemm=gemm, layer_ops=layer_ops)
    args = ModelArgs.from_model_dir(model_dir)
    lora, cache = build_lora_runtime(config, args, resolve_dtype(config))
    return LLMEngine(config, args=args, lora=lora, adapters=cache)


def fill(engine, refs: list[Any], batch: int, prompt_len: int, max_tokens: int) -> None:
    """Admit `batch` requests (base, adapter 1, adapter 2, ...) and run until all decode."""
    from runtime.types import EngineRequest, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = [1] + [(7 * i + 13 * p) % 40000 + 100 for p in range(prompt_len - 1)]
        engine.add_request(EngineRequest(f"p{i}", prompt, sampling, [None, *refs][i % 3]))
    for _ in range(100_000):
        running = engine.scheduler.running
        if len(running) == batch and all(s.num_output_tokens > 0 for s in running):
            return
        if not engine.step():
            time.sleep(0.005)  # an adapter is loading on the loader threads
    raise RuntimeError("the batch never reached decode")


class PartTimer:
    """Monkeypatched timers around the step's parts (restored by `close`)."""

    def __init__(self, engine) -> None:
        import runtime.engine as engine_mod
        import runtime.model.llama as llama_mod

        self.t: dict[str, float] = defaultdict(float)
        self._undo: list[tuple[Any, str, Any]] = []
        t = self.t

        def timed(name: str, fn):
            def wrapper(*a, **k):
                start = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    t[name] += time.perf_counter() - start
            return wrapper

        def linear(layer, name, x, projection):
            start = time.perf_counter()
            y = projection(x)
            t["base_gemm"] += time.perf_counter() - start
            if layer.lora is not None and layer.lora.active:
                start = time.perf_counter()
                layer.lora.apply(layer.idx, name, x, y)
                t["lora"] += time.perf_counter() - start
            return y

        self._patch(llama_mod.DecoderLayer, "_linear", linear)
        self._patch(llama_mod, "paged_attention", timed("attention", llama_mod.paged_attention))
        kv = engine.kv_cache
        self._patch(kv, "write", timed("attention", kv.write))
        self._patch(engine.model, "compute_logits", timed("lm_head", engine.model.compute_logits))
        self._patch(engine_mod, "sample", timed("sampler", engine_mod.sample))

    def _patch(self, obj: Any, name: str, value: Any) -> None:
        self._undo.append((obj, name, vars(obj).get(name, _MISSING)))
        setattr(obj, name, value)

    def close(self) -> None:
        for obj, name, old in reversed(self._undo):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


_MISSING = object()


def run_profile(model_dir: Path, batch: int, steps: int, legacy: bool,
                dtype: str | None = None, adapters_dir: Path | None = None,
                attention: str = "auto", prompt_len: int = 24,
                gemm: str = "auto", layer_ops: str = "auto") -> dict[str, Any]:
    import tempfile

    if legacy:
        import runtime.lora.store as store

        store.single_threaded = lambda: None  # loader threads keep torch's default count
    with tempfile.TemporaryDirectory() as tmp:
        refs = make_adapters(model_dir, adapters_dir or Path(tmp))
        max_len = max(1024, prompt_len + 2 * steps + 80)
        kv_bytes = None
        if max_len > 1024:  # the CPU default caps the pool at 1 GiB; long contexts need more
            from runtime.model.kv_cache import bytes_per_block
            from runtime.model.weights import ModelArgs

            blocks = batch * (max_len // 16 + 2)
            kv_bytes = blocks * bytes_per_block(ModelArgs.from_model_dir(model_dir), 16,
                                                torch.float32)
        engine = build_engine(model_dir, dtype, max_running=max(batch, 8), max_model_len=max_len,
                              attention="auto" if attention == "ab" else attention,
                              kv_cache_bytes=kv_bytes, gemm=gemm, layer_ops=layer_ops)
        if legacy:
            engine.lora._dense_ok = False  # the per-adapter segment loop, as before
        # "ab": the kernel and the gather path take turns step by step in this one process
        # (`engine.paged_kernel` is read per step), each timed on its own; on a shared machine
        # a load spike then hits both alike, which fresh processes one after the other cannot
        # promise.
        variants = ("gather", "kernel") if attention == "ab" else ("",)
        fill(engine, refs, batch, prompt_len=prompt_len,
             max_tokens=steps * len(variants) + 64)
        for _ in range(3):
            engine.step()
        timer = PartTimer(engine)
        totals: dict[str, list[float]] = {v: [] for v in variants}
        parts: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        try:
            for i in range(steps * len(variants)):
                variant = variants[i % len(variants)]
                if variant:
                    engine.paged_kernel = variant == "kernel"
                timer.t.clear()
                start = time.perf_counter()
                engine.step()
                total = time.perf_counter() - start
                totals[variant].append(total)
                parts[variant].append({**timer.t, "python": total - sum(timer.t.values())})
        finally:
            timer.close()
        common = {"batch": batch, "legacy": legacy, "dtype": str(engine.dtype),
                  "prompt_len": prompt_len, "threads": torch.get_num_threads(),
                  "gemm": engine.model.lm_head.backend,
                  "layer_ops": "fused" if engine.model.fused else "torch",
                  "dense_projections": sorted(engine.lora.dense_projections),
                  **roofline(engine, batch, [len(q.token_ids) for q in engine.scheduler.running])}
        out = {v or ("kernel" if engine.paged_kernel else "gather"): summarize(
            totals[v], parts[v]) | common for v in variants}
        return out if attention == "ab" else next(iter(out.values())) | {
            "attention": "paged kernel" if engine.paged_kernel else "gather"}


def summarize(totals: list[float], parts: list[dict[str, float]]) -> dict[str, Any]:
    order = sorted(range(len(totals)), key=totals.__getitem__)
    mid = parts[order[len(totals) // 2]]  # the parts of the median step
    return {"step_ms_median": statistics.median(totals) * 1e3, "step_ms_min": min(totals) * 1e3,
            "parts_ms": {p: mid.get(p, 0.0) * 1e3 for p in PARTS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--legacy", action="store_true")
    parser.add_argument("--dtype")
    parser.add_argument("--adapters-dir", type=Path)
    parser.add_argument("--attention", choices=("auto", "gather", "ab"), default="auto")
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--gemm", choices=("auto", "native", "onednn", "torch"), default="auto",
                        help="RuntimeConfig.gemm: our kernel or oneDNN over packed weights, "
                             "or F.linear")
    parser.add_argument("--layer-ops", choices=("auto", "torch"), default="auto",
                        help="RuntimeConfig.layer_ops: fused C++ norms and rotary, or torch")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()
    result = run_profile(args.model, args.batch, args.steps, args.legacy, args.dtype,
                         args.adapters_dir, args.attention, args.prompt_len, args.gemm,
                         args.layer_ops)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
