"""Engine throughput and latency against transformers, side by side in one run.

    .venv/bin/python bench/engine.py                 # full run, writes bench/results/engine.json
    .venv/bin/python bench/engine.py --quick         # built-in model only, fewer requests

For each model (the built-in one and a ~100M-parameter Llama with random weights) and each
concurrency c in {1, 8, 32, 64}: max(c, 4) greedy requests with prompts of 16..64 tokens
arrive at once and each generates `--max-tokens` tokens (EOS ignored). Three servers:
  ours          LLMEngine with max_running=c (continuous batching, paged KV cache)
  hf_sequential transformers `generate`, one request at a time
  hf_static     transformers `generate` on static left-padded batches of c
Reported: tokens/s over the makespan, time to first token (from arrival, queueing included)
and inter-token latency, p50/p99; our greedy tokens are checked against hf_sequential's.
All modes use the same number of torch threads (`--threads`, default 1).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from runtime.config import RuntimeConfig
from runtime.engine import LLMEngine
from runtime.model.builtin import ensure_builtin_model
from runtime.types import EngineRequest, SamplingParams

ROOT = Path(__file__).resolve().parents[1]

# ~100M parameters: 2 x 16000 x 768 embeddings + 12 layers of ~6.3M.
LLAMA_100M = dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4)


def make_100m_model(out: Path, builtin: Path) -> Path:
    """A Llama of ~100M random parameters (seeded), with the built-in model's tokenizer."""
    from safetensors.torch import save_file

    c = LLAMA_100M
    hidden, inter, heads, kv = (c["hidden_size"], c["intermediate_size"],
                                c["num_attention_heads"], c["num_key_value_heads"])
    head_dim = hidden // heads
    gen = torch.Generator().manual_seed(100)

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    w = {"model.embed_tokens.weight": normal(c["vocab_size"], hidden, std=0.5),
         "model.norm.weight": torch.ones(hidden), "lm_head.weight": normal(c["vocab_size"], hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": torch.ones(hidden),
              p + "post_attention_layernorm.weight": torch.ones(hidden),
              p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden),
              p + "self_attn.k_proj.weight": normal(kv * head_dim, hidden),
              p + "self_attn.v_proj.weight": normal(kv * head_dim, hidden),
              p + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
              p + "mlp.gate_proj.weight": normal(inter, hidden),
              p + "mlp.up_proj.weight": normal(inter, hidden),
              p + "mlp.down_proj.weight": normal(hidden, inter)}
    out.mkdir(parents=True, exist_ok=True)
    save_file(w, str(out / "model.safetensors"))
    config = json.loads((builtin / "config.json").read_text())
    config |= LLAMA_100M | {"head_dim": head_dim}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (out / name).write_bytes((builtin / name).read_bytes())
    return out


def workload(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 65, (n,), generator=gen).tolist()
    return [[1] + torch.randint(3, 1000, (k - 1,), generator=gen).tolist() for k in lengths]


def summarize(mode: str, tokens: list[list[int]], times: list[list[float]], t0: float,
              t_end: float) -> dict:
    ttft = [ts[0] - t0 for ts in times]
    itl = [b - a for ts in times for a, b in zip(ts, ts[1:], strict=False)]

    def pct(xs: list[float], q: float) -> float:
        return round(1000 * statistics.quantiles(xs, n=100, method="inclusive")[q - 1], 2) \
            if len(xs) > 1 else round(1000 * xs[0], 2)

    total = sum(len(t) for t in tokens)
    return {"mode": mode, "tokens": total, "seconds": round(t_end - t0, 3),
            "tokens_per_s": round(total / (t_end - t0), 1),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50) if itl else None,
            "itl_p99_ms": pct(itl, 99) if itl else None}


def run_ours(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[dict, list]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    times: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", p, params))
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            times.setdefault(out.request_id, []).extend([now] * len(out.new_token_ids))
    t_end = time.perf_counter()
    order = [f"r{i}" for i in range(len(prompts))]
    result = summarize("ours", [tokens[r] for r in order], [times[r] for r in order], t0, t_end)
    return result, [tokens[r] for r in order]


class StepClock:
    """A logits processor that only timestamps each decoding step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def hf_generate(model, batch: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list]:
    from transformers import LogitsProcessorList

    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    clock = StepClock()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens,
                         do_sample=False, eos_token_id=None,
                         pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    return out[:, width:].tolist(), clock.times


def run_hf(model, prompts: list[list[int]], max_tokens: int, batch_size: int,
           mode: str) -> tuple[dict, list]:
    tokens: list[list[int]] = []
    times: list[list[float]] = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        new, clock = hf_generate(model, prompts[start : start + batch_size], max_tokens)
        tokens += new
        times += [clock] * len(new)
    return summarize(mode, tokens, times, t0, time.perf_counter()), tokens


def bench_model(name: str, model_dir: Path, concurrency: list[int], max_tokens: int,
                min_requests: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for c in concurrency:
        prompts = workload(max(c, min_requests), seed=c)
        engine = LLMEngine(RuntimeConfig(model_dir=model_dir, max_running=c, max_batch_tokens=2048,
                                         max_gpu_adapters=0, kv_cache_bytes=None))
        run_ours(engine, workload(2, seed=0), 4)  # warm-up
        hf_generate(hf, workload(1, seed=0), 4)
        ours, our_tokens = run_ours(engine, prompts, max_tokens)
        seq, seq_tokens = run_hf(hf, prompts, max_tokens, 1, "hf_sequential")
        static, static_tokens = run_hf(hf, prompts, max_tokens, c, "hf_static")
        ours["identical_greedy_vs_hf_sequential"] = our_tokens == seq_tokens
        static["same_greedy_as_hf_sequential"] = static_tokens == seq_tokens
        for r in (ours, seq, static):
            r |= {"model": name, "concurrency": c, "num_requests": len(prompts),
                  "max_tokens": max_tokens,
                  "speedup_vs_hf_sequential": round(r["tokens_per_s"] / seq["tokens_per_s"], 2)}
            rows.append(r)
            print(f"{name:10} c={c:<3} {r['mode']:14} {r['tokens_per_s']:9.1f} tok/s  "
                  f"ttft p50 {r['ttft_p50_ms']:8.1f} p99 {r['ttft_p99_ms']:8.1f} ms  "
                  f"itl p50 {r['itl_p50_ms']} p99 {r['itl_p99_ms']} ms  "
                  f"x{r['speedup_vs_hf_sequential']}", flush=True)
        print(f"{name:10} c={c:<3} ours identical to hf_sequential: "
              f"{ours['identical_greedy_vs_hf_sequential']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="builtin,llama100m")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--min-requests", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="built-in model, concurrency 1,32")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine.json")
    args = ap.parse_args()
    if args.quick:
        args.models, args.concurrency = "builtin", "1,32"
    torch.set_num_threads(args.threads)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="loragate-bench-") as tmp:
        builtin = ensure_builtin_model(Path(tmp) / "builtin")
        dirs = {"builtin": builtin}
        if "llama100m" in args.models:
            dirs["llama100m"] = make_100m_model(Path(tmp) / "llama100m", builtin)
        for name in args.models.split(","):
            rows += bench_model(name, dirs[name], concurrency, args.max_tokens, args.min_requests)
    meta = {"command": "bench/engine.py " + " ".join(sys.argv[1:]), "threads": args.threads,
            "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                        time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
