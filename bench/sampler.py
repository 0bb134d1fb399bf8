"""The sampler's cost with every control on against off, and JSON-schema decoding against
unconstrained, side by side in one run.

    .venv/bin/python -m bench.sampler            # writes bench/results/sampler.json
    .venv/bin/python -m bench.sampler --quick    # fewer steps, no SmolLM2 part

1. Sampler step at batch 64 over SmolLM2's vocabulary (49152), random logits, one torch
   thread: `sample` with controls off (temperature 1, top_p 1) against the same rows with
   frequency, presence and repetition penalties, logit_bias (20 ids), min_tokens, top_k,
   min_p and top_p all on and different per row, every row with a 256-token prompt and 128
   generated tokens in its state. Reported: median CPU ms per step of each (thread CPU time,
   which a loaded shared machine inflates far less than wall time) and the difference (the
   added ms per step), plus greedy rows with the same controls.
2. SmolLM2 (when .cache/smollm2-135m-instruct holds it): `--batch` greedy requests asking
   for a JSON list of people, once with `response_format` json_schema and once without;
   generated tokens per second of each over the makespan and over the steps that ran the
   whole batch (the grammar's own cost), their ratio, and how many answers parse.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from runtime.model.sampler import Batch, SamplerState, make_generator, sample
from runtime.types import EngineRequest, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / ".cache" / "smollm2-135m-instruct"
VOCAB = 49152
BATCH = 64
PEOPLE = {"type": "array", "minItems": 3, "maxItems": 6, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                   "city": {"type": "string", "maxLength": 24}}}}


def controlled(i: int, temperature: float) -> SamplingParams:
    gen = torch.Generator().manual_seed(i)
    bias = tuple((int(t), float(b)) for t, b in zip(
        torch.randint(0, VOCAB, (20,), generator=gen).unique().tolist(),
        torch.empty(20).uniform_(-5, 5, generator=gen).tolist(), strict=False))
    return SamplingParams(
        max_tokens=512, temperature=temperature, top_p=0.9, top_k=20 + i, min_p=0.02,
        frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.1 + i / 640,
        logit_bias=bias, min_tokens=200, stop_token_ids=(7, 8))


def time_sampler(params: list[SamplingParams], steps: int) -> float:
    """Median CPU ms of one `sample` call over `steps` (this thread's CPU time: with one torch
    thread all the work is on it, and the shared machine's load does not inflate it), with
    state rows like a live batch's."""
    state = SamplerState(VOCAB, "cpu", BATCH)
    gen = torch.Generator().manual_seed(0)
    keys = [f"r{i}" for i in range(BATCH)]
    for key, p in zip(keys, params, strict=True):
        prompt = torch.randint(0, VOCAB, (256,), generator=gen).tolist()
        state.add(key, p, prompt, (2,), generated=torch.randint(0, VOCAB, (128,),
                                                                generator=gen).tolist())
    generators = [make_generator(i, "cpu") for i in range(BATCH)]
    logits = torch.randn(BATCH, VOCAB, generator=gen) * 3
    times = []
    for _ in range(steps + 3):
        start = time.thread_time()
        sample(logits, params, generators, Batch(state.rows(keys), state))
        times.append(time.thread_time() - start)
    return statistics.median(times[3:]) * 1000  # the first calls warm the allocator


def sampler_part(steps: int) -> dict[str, float]:
    off = [SamplingParams(max_tokens=512, temperature=1.0) for _ in range(BATCH)]
    on = [controlled(i, 1.0) for i in range(BATCH)]
    greedy_off = [SamplingParams(max_tokens=512, temperature=0.0) for _ in range(BATCH)]
    greedy_on = [controlled(i, 0.0) for i in range(BATCH)]
    out = {"sampled_off_ms": time_sampler(off, steps), "sampled_on_ms": time_sampler(on, steps),
           "greedy_off_ms": time_sampler(greedy_off, steps),
           "greedy_on_ms": time_sampler(greedy_on, steps)}
    out["sampled_added_ms"] = out["sampled_on_ms"] - out["sampled_off_ms"]
    out["greedy_added_ms"] = out["greedy_on_ms"] - out["greedy_off_ms"]
    return {k: round(v, 2) for k, v in out.items()}


def decode(engine, prompts: list[list[int]], params: SamplingParams) -> dict[str, object]:
    """Run the batch to the end: tokens/s over the makespan, and over the decode steps that
    ran the whole batch (a JSON answer that ends early shrinks the batch, which lowers the
    first figure for a reason that is not the grammar's cost), and the answers."""
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"q{i}", p, params))
    texts: dict[str, str] = {}
    reasons: dict[str, object] = {}
    tokens, full_steps = 0, []
    start = time.perf_counter()
    while engine.has_unfinished():
        step_start = time.perf_counter()
        outputs = engine.step()
        if len(outputs) == len(prompts) and all(o.num_output_tokens > 1 for o in outputs):
            full_steps.append(time.perf_counter() - step_start)
        for out in outputs:
            tokens += len(out.new_token_ids)
            texts[out.request_id] = texts.get(out.request_id, "") + out.text_delta
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    elapsed = time.perf_counter() - start
    step = statistics.median(full_steps) if full_steps else float("nan")
    return {"tokens_per_s": tokens / elapsed, "full_batch_tokens_per_s": len(prompts) / step,
            "tokens": tokens, "texts": texts, "reasons": reasons}


def json_part(batch: int, max_tokens: int) -> dict[str, object]:
    from runtime.config import RuntimeConfig
    from runtime.engine import build_engine
    from runtime.types import FinishReason

    engine = build_engine(RuntimeConfig(model_dir=SMOLLM2, max_gpu_adapters=0,
                                        max_model_len=1024, max_running=batch))
    asks = ["Give three people with their age and city as JSON.",
            "List a few friends of mine as JSON with name, age and city."]
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": asks[i % 2]}])
               for i in range(batch)]
    free = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    schema = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                            response_format="json_schema", json_schema=json.dumps(PEOPLE))
    decode(engine, prompts[:1], free)  # warm up the model and the grammar library
    decode(engine, prompts[:1], schema)
    plain, constrained = decode(engine, prompts, free), decode(engine, prompts, schema)
    stopped = [k for k, r in constrained["reasons"].items() if r is FinishReason.STOP]
    parsed = 0
    for key in stopped:
        try:
            json.loads(constrained["texts"][key])
            parsed += 1
        except ValueError:
            pass
    ratio = constrained["full_batch_tokens_per_s"] / plain["full_batch_tokens_per_s"]
    return {"batch": batch, "max_tokens": max_tokens,
            "unconstrained_tokens_per_s": round(plain["tokens_per_s"], 1),
            "json_schema_tokens_per_s": round(constrained["tokens_per_s"], 1),
            "unconstrained_full_batch_tokens_per_s": round(
                plain["full_batch_tokens_per_s"], 1),
            "json_schema_full_batch_tokens_per_s": round(
                constrained["full_batch_tokens_per_s"], 1),
            "json_schema_over_unconstrained_full_batch": round(ratio, 3),
            "json_schema_tokens": constrained["tokens"],
            "ended_by_stop_and_parse": f"{parsed}/{len(stopped)} (the rest hit max_tokens)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sampler.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, object] = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} torch thread(s)",
        "sampler_batch_64": sampler_part(5 if args.quick else args.steps)}
    print(json.dumps(result["sampler_batch_64"], indent=1))
    if not args.quick and (SMOLLM2 / "model.safetensors").exists():
        result["smollm2_json_schema"] = json_part(args.batch, args.max_tokens)
        print(json.dumps(result["smollm2_json_schema"], indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
