"""Multi-LoRA throughput: N requests over K adapters in one continuous batch, side by side with
PEFT one request at a time (`set_adapter`), PEFT mixed-batch `generate(adapter_names=...)` in
static batches, and our engine on the base model alone (the cost of LoRA).

    .venv/bin/python bench/multi_lora.py                # full run, writes bench/results/
    .venv/bin/python bench/multi_lora.py --quick        # a smaller smoke run

K in {1, 8, 64, 512}, uniform and Zipf popularity; the host tier holds fewer adapters than
K at 512, so those runs go back to the disk tier. Each engine run starts cold (empty slots,
host and disk tiers) and its time includes every adapter load. Greedy, fixed lengths.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from runtime.config import RuntimeConfig
from runtime.engine import build_engine
from runtime.model.builtin import ensure_builtin_model
from runtime.types import AdapterRef, EngineRequest, SamplingParams

ROOT = Path(__file__).resolve().parents[1]

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, ZIPF_S = 8, 16.0, 1.1


def make_adapters(model_dir: Path, out: Path, count: int) -> list[tuple[AdapterRef, Path]]:
    """One adapter written by PEFT itself; the rest share its tensor names, seeded values."""
    import hashlib

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    template = out / "template"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(MODULES),
                        lora_dropout=0.0, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(template)
    names = load_file(template / "adapter_model.safetensors")
    adapters = []
    for i in range(count):
        gen = torch.Generator().manual_seed(1000 + i)
        tensors = {name: torch.randn(t.shape, generator=gen) * (0.1 if "lora_A" in name else 0.05)
                   for name, t in names.items()}
        path = out / f"a{i}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        shutil.copy(template / "adapter_config.json", path / "adapter_config.json")
        data = (path / "adapter_model.safetensors").read_bytes()
        ref = AdapterRef.for_version(sha256=hashlib.sha256(data).hexdigest(),
                                     uri=(path / "adapter_model.safetensors").as_uri(),
                                     rank=RANK, alpha=ALPHA, target_modules=MODULES,
                                     name=f"bench/a{i}@1")
        adapters.append((ref, path))
    return adapters


def workload(num_requests: int, k: int, dist: str, prompt_len: int, seed: int = 0):
    """[(adapter index or None, prompt ids)]: popularity uniform or Zipf over k adapters."""
    gen = torch.Generator().manual_seed(seed)
    if dist == "zipf":
        weights = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** ZIPF_S
    else:
        weights = torch.ones(k, dtype=torch.float64)
    picks = torch.multinomial(weights, num_requests, replacement=True, generator=gen).tolist()
    if dist == "uniform" and num_requests >= k:
        picks = [i % k for i in range(num_requests)]  # every adapter gets used
    prompts = [[1] + torch.randint(3, 1000, (prompt_len,), generator=gen).tolist()
               for _ in range(num_requests)]
    return list(zip(picks, prompts, strict=True))


def run_engine(model_dir: Path, work, refs, args, adapters: bool, disk_dir: Path) -> dict:
    shutil.rmtree(disk_dir, ignore_errors=True)
    config = RuntimeConfig(
        model_dir=model_dir, max_running=args.concurrency, max_batch_tokens=args.batch_tokens,
        max_gpu_adapters=args.gpu_slots if adapters else 0, max_host_adapters=args.host_slots,
        max_lora_rank=RANK, adapter_disk_dir=disk_dir, max_waiting=len(work) + 1,
    )
    engine = build_engine(config)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, (pick, prompt) in enumerate(work):
        ref = refs[pick] if adapters and pick is not None else None
        engine.add_request(EngineRequest(f"r{i}", prompt, sampling, ref))
    tokens = errors = 0
    while engine.has_unfinished():
        outs = engine.step()
        for out in outs:
            tokens += len(out.new_token_ids)
            errors += out.error is not None
        if not outs and not engine.scheduler.running:
            time.sleep(0.001)  # everything waits on adapter loads
    result = timing(tokens, start, cpu_start)
    result["errors"] = errors
    if engine.adapters is not None:
        result["adapters"] = engine.adapters.stats()
        engine.adapters.close()
    return result


def timing(tokens: int, start: float, cpu_start: float) -> dict:
    """Wall-clock tokens/s, and tokens per CPU-second of this process (every thread): the
    second barely moves when other jobs share the machine, the first is what users see."""
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "cpu_seconds": cpu, "tokens_per_cpu_s": tokens / cpu}


def best_of(repeat: int, fn, *args) -> dict:
    """Run `repeat` times; keep the fastest (the machine is shared: noise only slows runs)."""
    runs = [fn(*args) for _ in range(repeat)]
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {**best, "all_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def load_peft(model_dir: Path, paths: list[Path]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, paths[0], adapter_name="a0")
    for i, path in enumerate(paths[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    return model.eval()


@torch.no_grad()
def run_peft_one_at_a_time(model, work, max_tokens: int) -> dict:
    tokens, start, cpu_start = 0, time.perf_counter(), time.process_time()
    for pick, prompt in work:
        model.set_adapter(f"a{pick}")
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        tokens += out.shape[1] - len(prompt)
    return timing(tokens, start, cpu_start)


@torch.no_grad()
def run_peft_mixed_batches(model, work, max_tokens: int, batch: int) -> dict:
    tokens, start, cpu_start = 0, time.perf_counter(), time.process_time()
    for b in range(0, len(work), batch):
        chunk = work[b : b + batch]
        width = max(len(p) for _, p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for _, p in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p in chunk])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                             adapter_names=[f"a{pick}" for pick, _ in chunk])
        tokens += (out.shape[1] - width) * len(chunk)
    return timing(tokens, start, cpu_start)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = results["config"]["ks"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dist in results["config"]["dists"]:
        ys = [results["engine"][f"{dist}-{k}"]["tokens_per_s"] for k in ks]
        ax.plot(ks, ys, marker="o", label=f"loragate, {dist}")
    ax.axhline(results["base"]["tokens_per_s"], color="gray", ls="--", label="loragate, base only")
    for name, label in (("peft_one", "PEFT one at a time"), ("peft_mixed", "PEFT mixed batch")):
        pts = [(k, results[name][str(k)]["tokens_per_s"]) for k in ks if str(k) in results[name]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="s", ls=":", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of adapters K")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{results['config']['num_requests']} requests, "
                 f"{results['config']['concurrency']} concurrent, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--gpu-slots", type=int, default=64)
    p.add_argument("--host-slots", type=int, default=128, help="< 512: K=512 spills to disk")
    p.add_argument("--ks", default="1,8,64,512")
    p.add_argument("--dists", default="uniform,zipf")
    p.add_argument("--peft-requests", type=int, default=16, help="requests per PEFT baseline")
    p.add_argument("--peft-max-k", type=int, default=64, help="PEFT baselines up to this K")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for every contender (1 is steadiest on a shared CPU)")
    p.add_argument("--repeat", type=int, default=2, help="runs per contender; the best is kept")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "multi_lora.json")
    args = p.parse_args()
    if args.quick:
        args.num_requests, args.max_tokens, args.peft_requests, args.ks = 128, 16, 8, "1,8,64"
        args.repeat = 1
    ks, dists = [int(k) for k in args.ks.split(",")], args.dists.split(",")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    work_dir = Path(tempfile.mkdtemp(prefix="loragate-multi-lora-"))
    try:
        model_dir = ensure_builtin_model(work_dir / "base")
        adapters = make_adapters(model_dir, work_dir / "adapters", max(ks))
        refs = [ref for ref, _ in adapters]
        results: dict = {"config": {**{k: (str(v) if isinstance(v, Path) else v)
                                       for k, v in vars(args).items()},
                                    "ks": ks, "dists": dists, "rank": RANK, "zipf_s": ZIPF_S,
                                    "torch_threads": torch.get_num_threads(),
                                    "machine": platform.machine()},
                         "engine": {}, "peft_one": {}, "peft_mixed": {}}
        base_work = workload(args.num_requests, 1, "uniform", args.prompt_len)
        # Warm-up: first calls pay for allocator growth and lazy initialisation.
        run_engine(model_dir, base_work[: args.concurrency], refs, args, True, work_dir / "disk")
        results["base"] = best_of(args.repeat, run_engine, model_dir, base_work, refs, args, False,
                                  work_dir / "disk")
        print(f"base model alone: {results['base']['tokens_per_s']:.0f} tok/s", flush=True)
        for k in ks:
            for dist in dists:
                work = workload(args.num_requests, k, dist, args.prompt_len)
                r = best_of(args.repeat, run_engine, model_dir, work, refs, args, True,
                            work_dir / "disk")
                results["engine"][f"{dist}-{k}"] = r
                print(f"loragate K={k:4d} {dist:8s}: {r['tokens_per_s']:8.0f} tok/s "
                      f"(loads {r['adapters']['loads']}, errors {r['errors']})", flush=True)
            if k <= args.peft_max_k:
                model = load_peft(model_dir, [path for _, path in adapters[:k]])
                work = workload(args.peft_requests, k, "uniform", args.prompt_len)
                one = best_of(args.repeat, run_peft_one_at_a_time, model, work, args.max_tokens)
                mixed_work = workload(args.concurrency, k, "uniform", args.prompt_len)
                mixed = best_of(args.repeat, run_peft_mixed_batches, model, mixed_work,
                                args.max_tokens, args.concurrency)
                results["peft_one"][str(k)], results["peft_mixed"][str(k)] = one, mixed
                print(f"PEFT     K={k:4d} one-at-a-time {one['tokens_per_s']:8.0f} tok/s, "
                      f"mixed batch {mixed['tokens_per_s']:8.0f} tok/s", flush=True)
                del model
        summarize(results, ks, dists)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        plot(results, args.out.with_suffix(".png"))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def summarize(results: dict, ks: list[int], dists: list[str]) -> None:
    """Ratios by wall clock and by CPU time (the latter robust to a shared machine)."""
    ratios: dict = {}
    for metric in ("tokens_per_s", "tokens_per_cpu_s"):
        eng, base = results["engine"], results["base"][metric]
        table: dict = {}
        header = ("K", "dist", metric, "/base", "/PEFT 1-by-1", "/PEFT mixed")
        print("\n{:>5} {:8} {:>16} {:>6} {:>12} {:>11}".format(*header))
        for k in ks:
            for dist in dists:
                tps = eng[f"{dist}-{k}"][metric]
                one = results["peft_one"].get(str(k), {}).get(metric)
                mixed = results["peft_mixed"].get(str(k), {}).get(metric)
                row = {"vs_base": tps / base, "vs_peft_one": tps / one if one else None,
                       "vs_peft_mixed": tps / mixed if mixed else None}
                table[f"{dist}-{k}"] = row
                cells = [f"{v:.2f}" if v is not None else "-" for v in row.values()]
                print(f"{k:5d} {dist:8} {tps:16.0f} {cells[0]:>6} {cells[1]:>12} {cells[2]:>11}")
        if 1 in ks and max(ks) > 1:
            for dist in dists:
                top = eng[f"{dist}-{max(ks)}"][metric] / eng[f"{dist}-1"][metric]
                table[f"{dist}-{max(ks)}_vs_1"] = top
                print(f"{dist}: K={max(ks)} / K=1 = {top:.2f}")
        ratios[metric] = table
    results["ratios"] = ratios


if __name__ == "__main__":
    main()
