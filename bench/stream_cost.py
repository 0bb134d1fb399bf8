"""What each streamed token costs on its way from the engine to the client, with no model.

    .venv/bin/python -m bench.stream_cost [--requests 48] [--max-tokens 64] [--step-ms 20]
    .venv/bin/python -m bench.stream_cost --code /work/main    # another tree's servers

The runtime's real HTTP app (`runtime.http.app`) and its real `AsyncLLMEngine` thread serve
a fake engine: each step (it sleeps `--step-ms`, standing in for the forward, and uses no
CPU) gives every running request one token. `loragate serve --runtimes` sits in front. The
same 48 chats as bench/real_model's API run go through the gateway, non-streamed
(`bench.chat_load`) and streamed (SSE, read chunk by chunk), and the CPU time the runtime
and gateway processes spent is divided by the tokens they carried: the per-token cost of
runtime/http/app.py -> runtime_client.py -> pipeline -> openai_format / the SSE writer.
With `--code DIR` the two servers run that tree's code (e.g. main, for before/after in one
run); the load and the counting stay this tree's. Writes bench/results/stream_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "bench-stream-cost-admin-token"


# ------------------------------------------------------- the runtime side (its own process)


class _Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [1] + [b + 3 for b in text.encode()[:64]]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode("".join(m["content"] for m in messages))

    def token_text(self, token_id: int) -> str:
        return f" w{token_id}"


class _Config:
    max_waiting = 1024


class FakeEngine:
    """LLMEngine's interface as AsyncLLMEngine uses it; one token per request per step."""

    def __init__(self, step_s: float) -> None:
        self.config = _Config()
        self.step_s = step_s
        self.running: dict[str, list[Any]] = {}  # request id -> [request, tokens so far]

    def add_request(self, req: Any, checked: bool = False) -> None:
        self.running[req.request_id] = [req, 0]

    def abort(self, request_id: str) -> None:
        self.running.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def fail_all(self, message: str) -> list[Any]:
        self.running.clear()
        return []

    def stats(self) -> dict[str, Any]:
        return {"num_running": len(self.running), "num_waiting": 0}

    def step(self) -> list[Any]:
        from runtime.types import FinishReason, RequestOutput

        time.sleep(self.step_s)
        outputs = []
        for rid, entry in list(self.running.items()):
            req, n = entry
            entry[1] = n = n + 1
            done = n >= req.sampling.max_tokens
            outputs.append(RequestOutput(
                rid, [100 + n], None, f" w{n}", finished=done,
                finish_reason=FinishReason.LENGTH if done else None,
                num_prompt_tokens=len(req.prompt_token_ids), num_output_tokens=n))
            if done:
                del self.running[rid]
        return outputs


def serve_runtime(port: int, step_ms: float) -> None:
    import uvicorn

    from runtime.async_engine import AsyncLLMEngine
    from runtime.http.app import RuntimeInfo, create_runtime_app

    info = RuntimeInfo(model="stream-cost", device="cpu", max_model_len=4096,
                       vocab_size=49152, max_running=256, max_waiting=1024)
    front = AsyncLLMEngine(FakeEngine(step_ms / 1000), requests_checked=True)  # type: ignore[arg-type]
    app = create_runtime_app(front, tokenizer=_Tokenizer(), info=info)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---------------------------------------------------------------------- the load (this tree)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def streamed(url: str, key: str, models: list[str], messages: list[Any],
                   max_tokens: int) -> tuple[int, float]:
    """Every request at once with stream: true; (SSE content chunks read, wall seconds)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        async def one(model: str, msgs: Any) -> int:
            body = {"model": model, "messages": msgs, "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            chunks = 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                answer.raise_for_status()
                async for line in answer.aiter_lines():
                    if line.startswith("data: {") and '"content":"' in line:
                        chunks += 1
            return chunks

        start = time.perf_counter()
        done = await asyncio.gather(*(one(m, c) for m, c in zip(models, messages, strict=True)))
        return sum(done), time.perf_counter() - start


def measure(code: Path, requests: int, max_tokens: int, step_ms: float) -> dict[str, Any]:
    import httpx

    from bench.chat_load import chat_load
    from bench.real_model import chats
    from runtime.model.builtin import ensure_builtin_model
    from tests.support.stub_procs import free_port, start_gateway, stop, wait_http

    env = os.environ | {"PYTHONPATH": str(code)}
    port = free_port()
    runtime = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-runtime",
                                str(port), "--step-ms", str(step_ms)], cwd=code, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", runtime)
        with tempfile.TemporaryDirectory() as tmp:
            base = ensure_builtin_model(Path(tmp) / "builtin")
            os.environ["PYTHONPATH"] = str(code)  # start_gateway runs with this environment
            try:
                gateway, url = start_gateway(Path(tmp) / "data", base,
                                             [f"http://127.0.0.1:{port}"], ADMIN,
                                             LORAGATE_LOG_LEVEL="WARNING")
            finally:
                os.environ["PYTHONPATH"] = str(ROOT)
            try:
                admin = {"Authorization": f"Bearer {ADMIN}"}
                httpx.post(f"{url}/admin/tenants", headers=admin, json={
                    "name": "bench", "requests_per_minute": 10**8, "tokens_per_minute": 10**9})
                key = httpx.post(f"{url}/admin/tenants/bench/keys", headers=admin,
                                 json={"name": "k"}).json()["key"]
                models, messages = [base.resolve().name] * requests, chats(requests)
                out: dict[str, Any] = {}
                for mode in ("whole", "stream", "whole", "stream"):  # the first pair warms up
                    cpu = cpu_seconds(runtime.pid), cpu_seconds(gateway.pid)
                    if mode == "whole":
                        tokens, wall, _ = chat_load(url, {"Authorization": f"Bearer {key}"},
                                                    models, messages, max_tokens)
                    else:
                        tokens, wall = asyncio.run(streamed(url, key, models, messages,
                                                            max_tokens))
                    rt, gw = cpu_seconds(runtime.pid) - cpu[0], cpu_seconds(gateway.pid) - cpu[1]
                    out[mode] = {"tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
                                 "runtime_us_per_token": rt / tokens * 1e6,
                                 "gateway_us_per_token": gw / tokens * 1e6}
                return out
            finally:
                stop(gateway)
    finally:
        stop(runtime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--code", type=Path, action="append",
                        help="a tree whose servers to measure (repeatable; default: this one)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve-runtime", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/stream_cost.json")
    args = parser.parse_args()
    if args.serve_runtime:
        serve_runtime(args.serve_runtime, args.step_ms)
        return
    trees = args.code or [ROOT]
    report: dict[str, Any] = {"requests": args.requests, "max_tokens": args.max_tokens,
                              "step_ms": args.step_ms, "load_average": os.getloadavg(),
                              "runs": {str(t): [] for t in trees}}
    for _ in range(args.rounds):  # interleaved: the machine's load hits every tree alike
        for tree in trees:
            result = measure(tree.resolve(), args.requests, args.max_tokens, args.step_ms)
            report["runs"][str(tree)].append(result)
            for mode, r in result.items():
                print(f"{str(tree):>24} {mode:>6}: {r['tok_s']:7.0f} tok/s, runtime "
                      f"{r['runtime_us_per_token']:5.0f} us/token, gateway "
                      f"{r['gateway_us_per_token']:5.0f} us/token", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
