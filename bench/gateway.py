"""The gateway's own cost: the same load against the stub runtime directly and through one
gateway process, side by side in one run.

    .venv/bin/python bench/gateway.py [--requests 5000] [--concurrency 64] [--redis-url URL]

Setup: `bench/stub_runtime.py` (answers every token at once) and `loragate serve --runtimes
<stub>` (one uvicorn worker, SQLite catalog; Redis for rate limits, caches and A/B figures
when `--redis-url` is given, else in-process). Through the gateway every request carries a
tenant key (auth), names an experiment (resolution + A/B assignment by `user`) and passes the
tenant's rate limit (set high enough never to refuse). Direct calls are the same generation
(16 tokens) as `/generate`. The client is a minimal keep-alive HTTP/1.1 client on asyncio, so
it costs little itself; it shares the machine's cores with the servers.

Reported per mode: requests/s, latency p50/p99; then the added latency (gateway - direct) at
p50/p99, the mean added time per request, and the gateway process's CPU time per request.
At concurrency 64 the added latency is mostly queueing (Little's law: 64 in flight over the
gateway's throughput), so a second pass one request at a time (`*_c1`) gives the gateway's
own added latency per request.
Writes bench/results/gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.stub_procs import start_gateway, start_stub, stop

ROOT = Path(__file__).resolve().parents[1]

ADMIN = "bench-admin-token-0a1b2c3d"
MAX_TOKENS = 16


class Conn:
    """One keep-alive HTTP/1.1 connection; answers read by Content-Length or chunks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, raw: bytes) -> int:
        self.writer.write(raw)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length, chunked = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if not chunked:
            await self.reader.readexactly(length)
            return status
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            await self.reader.readexactly(size + 2)
            if size == 0:
                return status


def http_post(url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    payload = json.dumps(body).encode()
    host = url.removeprefix("http://")
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


async def load(url: str, requests: list[bytes], concurrency: int) -> dict[str, Any]:
    host_port = url.removeprefix("http://")
    host, port = host_port.split(":")
    conns = [Conn(*await asyncio.open_connection(host, int(port))) for _ in range(concurrency)]
    latencies: list[float] = []
    failures = 0
    next_index = 0

    async def worker(conn: Conn) -> None:
        nonlocal next_index, failures
        while next_index < len(requests):
            raw = requests[next_index]
            next_index += 1
            started = time.perf_counter()
            status = await conn.request(raw)
            latencies.append(time.perf_counter() - started)
            failures += status != 200

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - started
    for conn in conns:
        conn.writer.close()
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {"requests": len(latencies), "failures": failures, "seconds": round(elapsed, 3),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(ms[len(ms) // 2], 3), "p99_ms": round(ms[int(len(ms) * 0.99)], 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def setup_tenant(url: str, adapter_dir: Path) -> str:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    httpx.post(f"{url}/admin/tenants", headers=admin, json={
        "name": "bench", "requests_per_minute": 10**8, "tokens_per_minute": 10**9})
    key = httpx.post(f"{url}/admin/tenants/bench/keys", headers=admin, json={"name": "b"}).json()
    files = {part: (name, (adapter_dir / name).read_bytes())
             for part, name in (("adapter_config", "adapter_config.json"),
                                ("adapter_model", "adapter_model.safetensors"))}
    for adapter in ("a", "b"):
        answer = httpx.post(f"{url}/admin/tenants/bench/adapters/{adapter}/versions",
                            headers=admin, files=files, timeout=60)
        assert answer.status_code == 201, answer.text
    experiment = {"variants": [{"name": "control", "adapter": "a", "weight": 90},
                               {"name": "canary", "adapter": "b", "weight": 10}]}
    httpx.put(f"{url}/admin/tenants/bench/experiments/ab", headers=admin, json=experiment)
    return str(key["key"])


def make_adapter(base_model_dir: Path, out: Path) -> Path:
    from tests.support.gw_helpers import make_peft_adapter

    return make_peft_adapter(base_model_dir, out, rank=8, alpha=16,
                             target_modules=["q_proj", "v_proj"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gateway.json"))
    args = parser.parse_args()

    from runtime.model.builtin import ensure_builtin_model

    with tempfile.TemporaryDirectory() as tmp:
        base = ensure_builtin_model(Path(tmp) / "builtin")
        adapter_dir = make_adapter(base, Path(tmp) / "adapter")
        stub, stub_url = start_stub()
        env = {"LORAGATE_REDIS_URL": args.redis_url} if args.redis_url else {}
        gateway, gw_url = start_gateway(Path(tmp) / "data", base, [stub_url], ADMIN,
                                        LORAGATE_LOG_LEVEL="WARNING", **env)
        try:
            key = setup_tenant(gw_url, adapter_dir)
            direct = [http_post(stub_url, "/generate", {
                "request_id": f"r{i}", "tenant": "bench", "prompt": "hello there",
                "sampling": {"max_tokens": MAX_TOKENS}}, {}) for i in range(args.requests)]
            via = [http_post(gw_url, "/v1/completions", {
                "model": "ab", "prompt": "hello there", "max_tokens": MAX_TOKENS,
                "user": f"user-{i % 1000}"}, {"Authorization": f"Bearer {key}"})
                for i in range(args.requests)]
            warm = args.concurrency * 4
            asyncio.run(load(stub_url, direct[:warm], args.concurrency))
            asyncio.run(load(gw_url, via[:warm], args.concurrency))
            results = {"direct": asyncio.run(load(stub_url, direct, args.concurrency))}
            cpu_before = cpu_seconds(gateway.pid)
            results["gateway"] = asyncio.run(load(gw_url, via, args.concurrency))
            cpu_ms = (cpu_seconds(gateway.pid) - cpu_before) * 1000 / args.requests
            # One at a time: the gateway's own added latency, without queueing behind 63 others.
            light = args.requests // 10
            results["direct_c1"] = asyncio.run(load(stub_url, direct[:light], 1))
            results["gateway_c1"] = asyncio.run(load(gw_url, via[:light], 1))
            if results["gateway"]["failures"] or results["direct"]["failures"]:
                raise SystemExit(f"failed requests: {results}")
        finally:
            stop(gateway)
            stop(stub)
    d, g = results["direct"], results["gateway"]
    report = {
        "command": "python bench/gateway.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "concurrency": args.concurrency, "max_tokens": MAX_TOKENS,
        "state": "redis" if args.redis_url else "in-process",
        **results,
        "added_p50_ms": round(g["p50_ms"] - d["p50_ms"], 3),
        "added_p99_ms": round(g["p99_ms"] - d["p99_ms"], 3),
        "added_mean_ms": round(g["mean_ms"] - d["mean_ms"], 3),
        "gateway_cpu_ms_per_request": round(cpu_ms, 3),
        "added_c1_p50_ms": round(results["gateway_c1"]["p50_ms"] - results["direct_c1"]["p50_ms"],
                                 3),
        "added_c1_p99_ms": round(results["gateway_c1"]["p99_ms"] - results["direct_c1"]["p99_ms"],
                                 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
