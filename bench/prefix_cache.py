"""Prefix caching on a real checkpoint (SmolLM2-135M-Instruct): a ~500-token system prompt.

    .venv/bin/python -m bench.prefix_cache            # -> bench/results/prefix_cache.json
    .venv/bin/python -m bench.prefix_cache --quick    # fewer samples and requests

Side by side in one run, in process, fp32, greedy, the same chat prompts (ChatML):
  ttft        time to the first token of one request alone: cold (a tenant whose cache holds
              nothing, so the whole prompt prefills) against warm (the same tenant and system
              prompt answered before), alternated, medians; the warm answers must equal the
              cold ones token for token
  throughput  48 requests at once that share the system prompt (one tenant) against 48 of
              the same lengths that cannot share it (a tenant each), and the same 48 shared
              ones with the cache off
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.step_profile import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
POLICY = ("You are the support assistant of Northwind Outfitters, a shop for hiking and "
          "camping gear. Answer politely and briefly. Orders ship within two business days; "
          "returns are free within thirty days if the item is unused and in its box. Never "
          "promise discounts, never ask for card numbers, and hand billing disputes to a "
          "human agent. Recommend products only from the catalogue: tents, sleeping bags, "
          "stoves, boots, rain jackets, headlamps and water filters. ")
QUESTIONS = ("Where is my order?", "Can I return boots I wore once?", "Which tent for two?",
             "Do you ship abroad?", "How warm is your winter bag?", "Is the stove safe?",
             "Can I pay later?", "What headlamp lasts longest?")


def system_prompt(tokenizer: Any, target_tokens: int) -> str:
    text = ""
    while len(tokenizer.encode(text)) < target_tokens:
        text += POLICY
    return text


def chat(tokenizer: Any, system: str, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "system", "content": system},
                                          {"role": "user", "content": question}])


def make_engine(model_dir: Path, caching: bool, max_running: int = 64):
    from runtime.config import RuntimeConfig
    from runtime.engine import LLMEngine

    config = RuntimeConfig(model_dir=model_dir, max_running=max_running, max_batch_tokens=4096,
                           max_gpu_adapters=0, enable_prefix_caching=caching)
    return LLMEngine(config)


def run(engine: Any, requests: list[tuple[str, str, list[int]]], max_tokens: int
        ) -> dict[str, Any]:
    """Add (id, tenant, prompt) requests at once and run them; first-token times, tokens."""
    from runtime.types import EngineRequest, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for rid, tenant, prompt in requests:
        engine.add_request(EngineRequest(rid, prompt, sampling, tenant=tenant))
    first: dict[str, float] = {}
    tokens: dict[str, list[int]] = {rid: [] for rid, _, _ in requests}
    cached: dict[str, int] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter() - start
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                cached[out.request_id] = out.num_cached_tokens
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "first": first, "tokens": tokens, "cached": cached,
            "tokens_per_s": sum(len(t) for t in tokens.values()) / seconds}


def ttft(engine: Any, tokenizer: Any, system: str, samples: int) -> dict[str, Any]:
    warm_up = chat(tokenizer, system, "Hello!")
    run(engine, [("warm-up", "acme", warm_up)], 1)  # acme's system prompt is now cached
    cold, warm, agree, prompt_tokens, cached_tokens = [], [], 0, 0, 0
    for i in range(samples):
        prompt = chat(tokenizer, system, QUESTIONS[i % len(QUESTIONS)])
        # A tenant never seen before: its prompt cannot hit anything.
        c = run(engine, [(f"cold-{i}", f"cold-tenant-{i}", prompt)], 8)
        w = run(engine, [(f"warm-{i}", "acme", prompt)], 8)
        cold.append(c["first"][f"cold-{i}"])
        warm.append(w["first"][f"warm-{i}"])
        agree += c["tokens"][f"cold-{i}"] == w["tokens"][f"warm-{i}"]
        prompt_tokens, cached_tokens = len(prompt), w["cached"][f"warm-{i}"]
        assert c["cached"][f"cold-{i}"] == 0
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    return {"prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens,
            "cold_ms": 1000 * cold_s, "warm_ms": 1000 * warm_s, "speedup": cold_s / warm_s,
            "answers_equal": f"{agree}/{samples}", "samples": samples}


def throughput(model_dir: Path, tokenizer: Any, system: str, num_requests: int,
               max_tokens: int) -> dict[str, Any]:
    prompts = [chat(tokenizer, system, QUESTIONS[i % len(QUESTIONS)]) for i in range(num_requests)]
    shared = [(f"s{i}", "acme", p) for i, p in enumerate(prompts)]
    apart = [(f"a{i}", f"tenant-{i}", p) for i, p in enumerate(prompts)]
    results = {}
    for label, caching, requests in (("shared", True, shared), ("not_shared", True, apart),
                                     ("shared_cache_off", False, shared)):
        engine = make_engine(model_dir, caching)
        got = run(engine, requests, max_tokens)
        results[label] = {
            "seconds": got["seconds"], "tokens_per_s": got["tokens_per_s"],
            "ttft_median_ms": 1000 * statistics.median(got["first"].values()),
            "cached_prompt_tokens": sum(got["cached"].values()),
            "prompt_tokens": sum(len(p) for _, _, p in requests),
            "tokens": got["tokens"],
        }
    on, off = results["shared"]["tokens"], results["shared_cache_off"]["tokens"]
    same = sum(on[f"s{i}"] == off[f"s{i}"] for i in range(num_requests))
    for r in results.values():
        del r["tokens"]
    results["answers_equal_with_cache_off"] = f"{same}/{num_requests}"
    results["speedup_shared_over_not_shared"] = (results["shared"]["tokens_per_s"]
                                                 / results["not_shared"]["tokens_per_s"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--system-tokens", type=int, default=500)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/prefix_cache.json")
    opts = parser.parse_args()
    if not (opts.model / "config.json").exists():
        raise SystemExit(f"no model at {opts.model}: run `make model` first")
    torch.set_num_threads(opts.threads)
    samples, num_requests, max_tokens = (3, 16, 16) if opts.quick else (7, 48, 32)
    engine = make_engine(opts.model, caching=True)
    system = system_prompt(engine.tokenizer, opts.system_tokens)
    first = ttft(engine, engine.tokenizer, system, samples)
    print(f"time to first token, {first['prompt_tokens']}-token prompt "
          f"({first['cached_tokens']} cached when warm), medians of {samples}:")
    print(f"  cold {first['cold_ms']:8.1f} ms   warm {first['warm_ms']:8.1f} ms   "
          f"warm is {first['speedup']:.1f}x faster   answers equal {first['answers_equal']}")
    rates = throughput(opts.model, engine.tokenizer, system, num_requests, max_tokens)
    print(f"{num_requests} requests at once, {max_tokens} tokens each:")
    for label in ("shared", "not_shared", "shared_cache_off"):
        r = rates[label]
        print(f"  {label:17s} {r['tokens_per_s']:7.1f} tok/s  {r['seconds']:6.2f} s  "
              f"TTFT median {r['ttft_median_ms']:7.1f} ms  cached "
              f"{r['cached_prompt_tokens']}/{r['prompt_tokens']} prompt tokens")
    print(f"  shared / not shared: {rates['speedup_shared_over_not_shared']:.2f}x   answers "
          f"equal with the cache off: {rates['answers_equal_with_cache_off']}")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps({"ttft": first, "throughput": rates,
                                    "threads": opts.threads, "when": time.ctime()}, indent=2))
    print(f"-> {opts.out}")


if __name__ == "__main__":
    main()
