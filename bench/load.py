"""Open-loop load on a real stack: goodput, latency and errors from below to far past capacity.

    .venv/bin/python bench/load.py          # ~5 min: bench/results/load.json, load_latency.png
    .venv/bin/python bench/load.py --quick  # ~1.5 min smoke (writes the same files)

Setup: `loragate runtime` on the built-in model (CPU; 64 device adapter slots, as many as
its max_running, and a host tier that holds all 120 adapters, as one would size it for this
catalog) and `loragate serve --runtimes` in front of it; 10 tenants with a key each and
12 adapters each (120 in all: real PEFT-format LoRA, rank 8 on all seven linear modules,
seeded values, written by bench/multi_lora.py's generator, uploaded through the admin API).
Every request streams a completion (`max_tokens` greedy tokens, usage at the end) from the
adapter drawn by Zipf popularity (s = 1.1) over the 120; adapter of popularity rank r belongs
to tenant r mod 10, so tenant t0 owns the hottest adapter and about 30% of the traffic.

Capacity is measured first with a closed-loop probe (as many clients as the runtime's
max_running, after a warm-up that loads the hot adapters); then Poisson arrivals (seeded)
run at multiples of it. Open loop: each arrival is a task launched at its scheduled time,
whatever the earlier ones are doing. Latency counts from when the client sent the request;
the report also gives the p99 counted from the scheduled time and the client's lag behind
its schedule, so a client that falls behind shows instead of hiding queueing. A phase ends
when its arrivals have all been launched and answered. The CPU each process used (load
client included) is reported per phase.

Rate limits: nine tenants get limits they never reach. t0 is the deliberately noisy one: its
requests-per-minute limit is set, after the probe, to half of what its Zipf share would send
at 1.0x capacity. The bucket holds one minute of its limit, so its 429s appear only once the
phases above 0.5x have drained that minute: in the overload phases.

Per phase: offered and achieved rates, goodput (successful answers/s, tokens/s), p50/p95/p99
time to first token and end-to-end latency of the successes, error rates by status (429, 503,
other), the gateway's own shed counts from /metrics, and the resident memory (VmRSS) of the
gateway and its runtime child before the first phase, after each one and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]

ADMIN = "bench-load-admin-token-7f3e"
NUM_TENANTS, ADAPTERS_PER_TENANT, ZIPF_S = 10, 12, 1.1
GENEROUS = {"requests_per_minute": 10**7, "tokens_per_minute": 10**9}
WORDS = ("the cat sat on a mat while rain fell over quiet hills and the river ran past old "
         "stone walls where birds sang songs of early spring light").split()
# Memory counts as flat when the end is within this much of the sample before the first
# phase (taken after the warm-up and capacity probe, so caches and pools are filled).
FLAT_FRACTION, FLAT_MIB = 0.10, 16.0
REQUEST_TIMEOUT_S = 120.0


# ------------------------------------------------------------------------------ processes


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_stack(data_dir: Path, base: Path, log: Path, slots: int
                ) -> tuple[list[subprocess.Popen[bytes]], str]:
    """`loragate runtime` (CPU, `slots` device adapter slots, every adapter fits its host
    tier) and `loragate serve --runtimes` in front of it; returns once /readyz answers 200."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_")}
    env.update(LORAGATE_ADMIN_TOKEN=ADMIN, LORAGATE_LOG_LEVEL="WARNING")
    runtime_port, port = free_port(), free_port()
    cli = [sys.executable, "-m", "gateway.cli"]
    runtime_cpus, edge_cpus = split_cpus()
    with log.open("wb") as out:
        runtime = spawn_on(
            runtime_cpus,
            [*cli, "runtime", "--base-model", str(base), "--device", "cpu",
             "--port", str(runtime_port), "--max-gpu-adapters", str(slots),
             "--max-host-adapters", str(NUM_TENANTS * ADAPTERS_PER_TENANT),
             # The runtime opens artifacts only in the store this gateway writes.
             "--artifacts-dir", str((data_dir / "artifacts").resolve())],
            env={**env, "OMP_NUM_THREADS": str(len(runtime_cpus))}, out=out)
        gateway = spawn_on(
            edge_cpus,
            [*cli, "serve", "--port", str(port), "--data-dir", str(data_dir),
             "--base-model", str(base), "--runtimes", f"http://127.0.0.1:{runtime_port}"],
            env=env, out=out)
    os.sched_setaffinity(0, edge_cpus)  # this load client shares the gateway's CPU
    procs, url = [gateway, runtime], f"http://127.0.0.1:{port}"
    if wait_ready(f"{url}/readyz", procs, timeout_s=180):
        return procs, url
    stop_stack(procs)
    raise SystemExit(f"the stack did not get ready:\n{log.read_text()[-3000:]}")


def wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout_s: float) -> bool:
    """Whether `url` answered 200 within `timeout_s`; False at once if one of `procs` (the
    servers behind it) exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return False


def split_cpus() -> tuple[set[int], set[int]]:
    """The runtime's CPUs and the edge's (gateway and this load client).

    On a GPU host the runtime's work is on the device and the gateway has the CPUs to
    itself. With every core shared, the runtime's matmul threads competed with the gateway's
    and the client's event loops: past capacity the client saw p99 latencies of 44-66 s
    while the gateway's own histogram stayed under 10 s, and the client fell seconds behind
    its arrival schedule. So the runtime gets all cores but the last, the gateway and the
    client the last one.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return set(cpus[:-1]), {cpus[-1]}


def spawn_on(cpus: set[int], command: list[str], env: dict[str, str], out: Any
             ) -> subprocess.Popen[bytes]:
    """Start `command` pinned to `cpus`: a child inherits the affinity it is forked with."""
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        return subprocess.Popen(command, cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    finally:
        os.sched_setaffinity(0, mine)


def stop_stack(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_use(before: dict[str, float | None], after: dict[str, float | None],
            wall_s: float) -> dict[str, float | None]:
    """Each process's share of one core over a phase: 1.0 is a core kept fully busy."""
    return {name: (round((after[name] - b) / wall_s, 2)  # type: ignore[operator]
                   if b is not None and after.get(name) is not None else None)
            for name, b in before.items()}


def memory(procs: dict[str, int]) -> dict[str, float | None]:
    return {name: (round(v, 1) if (v := rss_mib(pid)) is not None else None)
            for name, pid in procs.items()}


def scrape(url: str) -> dict[str, Any]:
    """The gateway's shed counts and its latency histogram (summed over tenants, adapters)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    shed = {m[1]: float(m[2]) for m in
            re.finditer(r'^loragate_requests_shed_total\{reason="([^"]+)"\} (\S+)$', text, re.M)}
    buckets: dict[float, float] = {}
    bucket = r'^loragate_request_latency_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)$'
    for m in re.finditer(bucket, text, re.M):
        buckets[float(m[1])] = buckets.get(float(m[1]), 0.0) + float(m[2])
    return {"shed": shed, "latency_buckets": buckets}


def server_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """p50/p99 of the gateway's own latency histogram over one phase (every answer, errors
    included), as the upper bound of the bucket holding it: what the gateway measured from
    the request's start to its last byte, whatever the load client's own delays."""
    delta = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = delta[-1][1] if delta else 0.0
    out: dict[str, Any] = {}
    for name, q in (("p50_le_ms", 0.5), ("p99_le_ms", 0.99)):
        hit = next((le for le, n in delta if total and n >= q * total), None)
        out[name] = None if hit is None or math.isinf(hit) else round(hit * 1000)
    return out


def runtime_limits(url: str) -> tuple[int, int]:
    """(max_running of the runtime, the gateway's in-flight cap for it), from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(r'^loragate_runtime_in_flight_limit\{runtime="([^"]+)"\} (\S+)$', text,
                      re.M)
    if found is None:
        raise SystemExit("the gateway's /metrics has no runtime in-flight limit")
    stats = httpx.get(f"{found[1]}/stats", timeout=10).json()
    return int(stats["limits"]["max_running"]), int(float(found[2]))


# -------------------------------------------------------------------------------- tenants


@dataclass
class Catalog:
    keys: dict[str, str] = field(default_factory=dict)  # tenant -> key
    by_rank: list[tuple[str, str]] = field(default_factory=list)  # (tenant, adapter) by rank


def tenant_of_rank(rank: int) -> str:
    return f"t{rank % NUM_TENANTS}"


def setup_tenants(url: str, adapter_dirs: list[Path], tenants: list[str],
                  limits: dict[str, dict[str, int]], catalog: Catalog) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=url, headers=admin, timeout=60) as client:
        for tenant in tenants:
            answer = client.post("/admin/tenants", json={"name": tenant, **limits[tenant]})
            assert answer.status_code == 201, answer.text
            answer = client.post(f"/admin/tenants/{tenant}/keys", json={"name": "load"})
            catalog.keys[tenant] = str(answer.json()["key"])
        for rank, directory in enumerate(adapter_dirs):
            tenant = tenant_of_rank(rank)
            if tenant not in tenants:
                continue
            name = f"a{rank:03d}"
            files = {part: (fname, (directory / fname).read_bytes())
                     for part, fname in (("adapter_config", "adapter_config.json"),
                                         ("adapter_model", "adapter_model.safetensors"))}
            answer = client.post(f"/admin/tenants/{tenant}/adapters/{name}/versions", files=files)
            assert answer.status_code == 201, answer.text
    catalog.by_rank = [(tenant_of_rank(r), f"a{r:03d}") for r in range(len(adapter_dirs))]


def zipf_weights(n: int) -> list[float]:
    return [1.0 / (r + 1) ** ZIPF_S for r in range(n)]


# ------------------------------------------------------------------------------- requests


@dataclass
class Outcome:
    tenant: str
    status: int = 0  # HTTP status; 200 with an error event counts as "other"
    ok: bool = False
    scheduled: float = 0.0  # loop times: the arrival's slot on the Poisson clock,
    sent: float = 0.0  # when the client got to send it (later if the client lags),
    first: float | None = None  # the first SSE event (a token),
    done: float = 0.0  # the end of the answer
    tokens: int = 0


def request_body(rng: random.Random, model: str, max_tokens: int) -> dict[str, Any]:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16)))
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}


async def one(client: httpx.AsyncClient, scheduled: float, tenant: str, key: str,
              body: dict[str, Any]) -> Outcome:
    """One streamed completion over a plain asyncio connection.

    Not through httpx: at ~100 requests/s httpx's per-request and per-chunk bookkeeping
    kept a whole core busy (8 ms of CPU per request), so on a small machine the client
    starved itself and the gateway and measured its own lag. This reads only what the
    figures need: the status, the first SSE event, error events and the usage chunk.
    """
    loop = asyncio.get_running_loop()
    out = Outcome(tenant, scheduled=scheduled, sent=loop.time())
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {client.base_url.host}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    writer = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(client.base_url.host,
                                                           client.base_url.port)
            writer.write(head + payload)
            status_line = await reader.readline()
            out.status = int(status_line.split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if out.status != 200 or "chunked" not in headers.get("transfer-encoding", ""):
                await reader.read()  # Connection: close: the body ends with the connection
                out.done = loop.time()
                return out
            tail, errored = b"", False
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                piece = (await reader.readexactly(size + 2))[:-2]
                if out.first is None and b"data: " in piece:
                    out.first = loop.time()
                errored = errored or b'data: {"error"' in piece
                tail = (tail + piece)[-4096:]
            out.done = loop.time()
            events = [e for e in tail.split(b"\n\n") if e.startswith(b"data: {")]
            usage = json.loads(events[-1][6:]).get("usage") if events else None
            out.tokens = int(usage["completion_tokens"]) if usage else 0
            out.ok = not errored and usage is not None
    except (OSError, TimeoutError, ValueError, IndexError, asyncio.IncompleteReadError):
        out.done = loop.time()
    finally:
        if writer is not None:
            writer.close()
    return out


def draw(rng: random.Random, catalog: Catalog, cum: list[float]) -> tuple[str, str]:
    tenant, adapter = catalog.by_rank[rng.choices(range(len(cum)), cum_weights=cum)[0]]
    return tenant, adapter


async def closed_loop(client: httpx.AsyncClient, catalog: Catalog, concurrency: int,
                      seconds: float, max_tokens: int, seed: int) -> list[Outcome]:
    rng, cum = random.Random(seed), _cumulative(len(catalog.by_rank))
    loop = asyncio.get_running_loop()
    end, results = loop.time() + seconds, []

    async def worker() -> None:
        while loop.time() < end:
            tenant, adapter = draw(rng, catalog, cum)
            results.append(await one(client, loop.time(), tenant, catalog.keys[tenant],
                                     request_body(rng, adapter, max_tokens)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def open_loop(client: httpx.AsyncClient, catalog: Catalog, rate: float, seconds: float,
                    max_tokens: int, seed: int
                    ) -> tuple[list[Outcome], float, dict[str, float]]:
    """Poisson arrivals at `rate`/s for `seconds`; returns outcomes, the wall time from the
    first arrival to the last answer and the peak in-flight count seen."""
    rng, cum = random.Random(seed), _cumulative(len(catalog.by_rank))
    arrivals, t = [], rng.expovariate(rate)
    while t < seconds:
        tenant, adapter = draw(rng, catalog, cum)
        arrivals.append((t, tenant, request_body(rng, adapter, max_tokens)))
        t += rng.expovariate(rate)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    peak: dict[str, float] = {}
    sampler = asyncio.create_task(sample_load(client, peak))
    for at, tenant, body in arrivals:
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(
            one(client, start + at, tenant, catalog.keys[tenant], body)))
    results = await asyncio.gather(*tasks)
    wall = loop.time() - start
    sampler.cancel()
    return list(results), wall, peak


async def sample_load(client: httpx.AsyncClient, peak: dict[str, float]) -> None:
    """Peak in-flight count the gateway holds on the runtime, sampled every 0.5 s: the cap
    at work (it must never pass `loragate_runtime_in_flight_limit`)."""
    pattern = re.compile(r'^loragate_runtime_in_flight\{[^}]*\} (\S+)$', re.M)
    while True:
        try:
            text = (await client.get("/metrics")).text
            for found in pattern.finditer(text):
                peak["in_flight"] = max(peak.get("in_flight", 0.0), float(found[1]))
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)


def _cumulative(n: int) -> list[float]:
    total, cum = 0.0, []
    for w in zipf_weights(n):
        total += w
        cum.append(total)
    return cum


# -------------------------------------------------------------------------------- figures


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1000, 1)


def summarize(outcomes: list[Outcome], arrivals_s: float, wall_s: float) -> dict[str, Any]:
    """Latency counts from the request's send; the client's lag behind the Poisson clock is
    reported beside it (on this shared machine the load client itself can fall behind)."""
    ok = [o for o in outcomes if o.ok]
    n = max(1, len(outcomes))
    by_status = {"429": sum(o.status == 429 for o in outcomes),
                 "503": sum(o.status == 503 for o in outcomes)}
    by_status["other"] = len(outcomes) - len(ok) - by_status["429"] - by_status["503"]
    ttft = [o.first - o.sent for o in ok if o.first is not None]
    lat = [o.done - o.sent for o in ok]
    return {
        "requests": len(outcomes), "successes": len(ok),
        "arrivals_s": round(arrivals_s, 2), "wall_s": round(wall_s, 2),
        "achieved_rate": round(len(outcomes) / arrivals_s, 2),
        # Over the time from the phase's start to its last answer: the server is busy all of
        # it, and the tail of answers after the last arrival counts too.
        "goodput_rps": round(len(ok) / wall_s, 2),
        "goodput_tokens_per_s": round(sum(o.tokens for o in ok) / wall_s, 1),
        "ttft_ms": {"p50": pct(ttft, 0.5), "p95": pct(ttft, 0.95), "p99": pct(ttft, 0.99)},
        "latency_ms": {"p50": pct(lat, 0.5), "p95": pct(lat, 0.95), "p99": pct(lat, 0.99)},
        "latency_from_schedule_p99_ms": pct([o.done - o.scheduled for o in ok], 0.99),
        "client_lag_p99_ms": pct([o.sent - o.scheduled for o in outcomes], 0.99),
        "errors": by_status,
        "error_rate": {k: round(v / n, 4) for k, v in by_status.items()},
        "errors_429_by_tenant": _count_by_tenant([o for o in outcomes if o.status == 429]),
    }


def _count_by_tenant(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.tenant] = counts.get(o.tenant, 0) + 1
    return dict(sorted(counts.items()))


def flat(samples: list[dict[str, Any]], name: str) -> dict[str, Any]:
    base, end = samples[0]["rss_mib"][name], samples[-1]["rss_mib"][name]
    peak = max(s["rss_mib"][name] or 0.0 for s in samples)
    if base is None or end is None:
        return {"flat": None}
    growth = end - base
    return {"before_mib": base, "end_mib": end, "peak_mib": round(peak, 1),
            "growth_mib": round(growth, 1),
            "flat": growth <= max(FLAT_FRACTION * base, FLAT_MIB)}


# ----------------------------------------------------------------------------------- main


async def drive(url: str, catalog: Catalog, args: argparse.Namespace, procs: dict[str, int],
                report: dict[str, Any], set_noisy_limit: Any) -> None:
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=url, limits=limits,
                                 timeout=httpx.Timeout(120.0, connect=30.0)) as client:
        max_running, cap = runtime_limits(url)
        report["runtime"] = {"max_running": max_running, "gateway_in_flight_cap": cap}
        # Warm-up: the hot adapters reach the runtime's slots, connections are opened.
        await closed_loop(client, catalog, max_running, args.warmup_s, args.max_tokens, 1)
        probe = await closed_loop(client, catalog, max_running, args.probe_s, args.max_tokens, 2)
        capacity = sum(o.ok for o in probe) / args.probe_s
        if capacity <= 0:
            raise SystemExit("the capacity probe completed no request")
        report["capacity"] = {"rps": round(capacity, 2), "concurrency": max_running,
                              "probe": summarize(probe, args.probe_s, args.probe_s)}
        print(f"capacity (closed loop, {max_running} clients): {capacity:.1f} req/s; "
              f"gateway in-flight cap {cap}", flush=True)
        await asyncio.to_thread(set_noisy_limit, capacity)
        print(HEADER, flush=True)
        samples = [{"at": "before first phase", "rss_mib": memory(procs)}]
        before = await asyncio.to_thread(scrape, url)
        # CPU of every process, the load client included: on a small machine the client can
        # run out of CPU before the gateway does, and then it measures itself.
        watched = {**procs, "client": os.getpid()}
        for index, multiple in enumerate(args.multiples):
            rate = multiple * capacity
            cpu_before = {name: cpu_seconds(pid) for name, pid in watched.items()}
            outcomes, wall, peak = await open_loop(client, catalog, rate, args.phase_s,
                                             args.max_tokens, 100 + index)
            now = await asyncio.to_thread(scrape, url)
            phase = {"multiple": multiple, "offered_rate": round(rate, 2),
                     **summarize(outcomes, args.phase_s, max(args.phase_s, wall)),
                     "peak_in_flight": int(peak.get("in_flight", 0)),
                     "cpu_cores": cpu_use(cpu_before, {name: cpu_seconds(pid) for name, pid
                                                       in watched.items()},
                                          max(args.phase_s, wall)),
                     "gateway_shed": {k: int(v - before["shed"].get(k, 0))
                                      for k, v in now["shed"].items()},
                     "gateway_latency": server_quantiles(before["latency_buckets"],
                                                         now["latency_buckets"])}
            phase["shedding"] = phase["errors"]["503"] > 0 or phase["errors"]["429"] > 0
            before = now
            samples.append({"at": f"after {multiple}x", "rss_mib": memory(procs)})
            report["phases"].append(phase)
            print_phase(phase, samples[-1]["rss_mib"])
        await asyncio.sleep(2)  # book-keeping tasks after the last answers
        samples.append({"at": "end", "rss_mib": memory(procs)})
        report["memory"] = {"samples": samples,
                            "criterion": f"end - before first phase <= max({FLAT_FRACTION:.0%}"
                                         f" of before, {FLAT_MIB:.0f} MiB)",
                            **{name: flat(samples, name) for name in procs}}


def print_phase(p: dict[str, Any], rss: dict[str, float | None]) -> None:
    er = p["error_rate"]
    print(f"{p['multiple']:>4}x {p['offered_rate']:7.1f} {p['achieved_rate']:7.1f} "
          f"{p['goodput_rps']:7.1f} {p['goodput_tokens_per_s']:8.0f} "
          f"{_ms(p['ttft_ms']['p50'])} {_ms(p['ttft_ms']['p99'])} "
          f"{_ms(p['latency_ms']['p50'])} {_ms(p['latency_ms']['p95'])} "
          f"{_ms(p['latency_ms']['p99'])} {er['429']:6.1%} {er['503']:6.1%} {er['other']:6.1%} "
          f"{'yes' if p['shedding'] else 'no':>5} {_ms(p['client_lag_p99_ms'])} "
          f"{_ms(p['gateway_latency']['p99_le_ms'])}  "
          + " ".join(f"{k}={v:.0f}" for k, v in rss.items() if v is not None) + "  "
          + " ".join(f"{k}={v:.2f}" for k, v in p["cpu_cores"].items() if v is not None),
          flush=True)


def _ms(value: float | None) -> str:
    return f"{value:8.0f}" if value is not None else "       -"


HEADER = (" mult  offered  arrived  good/s   tok/s  ttft50  ttft99   lat50   lat95   lat99"
          "    429    503  other  shed   lag99   gw99<  RSS MiB  CPU cores")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = report["phases"]
    x = [p["offered_rate"] for p in phases]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 7), sharex=True)
    for key, label, style in (("ttft_ms", "TTFT", "--"), ("latency_ms", "end-to-end", "-")):
        for q, marker in (("p50", "o"), ("p99", "s")):
            top.plot(x, [p[key][q] for p in phases], style, marker=marker, label=f"{label} {q}")
    top.set_ylabel("latency of successes (ms)")
    top.set_yscale("log")
    top.legend(fontsize=8)
    capacity = report["capacity"]["rps"]
    title = (f"open-loop Poisson load, {report['config']['adapters']} adapters (Zipf "
             f"{ZIPF_S}), {report['config']['tenants']} tenants; capacity {capacity:.1f} req/s")
    top.set_title(title, fontsize=9)
    bottom.plot(x, [p["goodput_rps"] for p in phases], "-o", color="tab:green",
                label="goodput (successes/s)")
    bottom.plot(x, x, ":", color="gray", label="offered")
    bottom.set_ylabel("requests / s")
    bottom.set_xlabel("offered rate (requests / s)")
    errors = bottom.twinx()
    errors.plot(x, [100 * p["error_rate"]["503"] for p in phases], "-^", color="tab:red",
                label="503 (shed)")
    errors.plot(x, [100 * p["error_rate"]["429"] for p in phases], "-v", color="tab:orange",
                label="429 (t0 rate limit)")
    errors.plot(x, [100 * p["error_rate"]["other"] for p in phases], "-x", color="black",
                label="other errors")
    errors.set_ylabel("% of requests refused")
    errors.set_ylim(0, 100)
    for ax in (top, bottom):
        ax.axvline(capacity, color="gray", lw=0.8)
    lines = bottom.get_legend_handles_labels()
    more = errors.get_legend_handles_labels()
    bottom.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(coro: Any) -> None:
    try:
        import uvloop  # uvicorn's loop, installed with the gateway: a cheaper client
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--phase-s", type=float, default=35.0, help="seconds of arrivals each")
    parser.add_argument("--multiples", default="0.5,1,1.5,2,3",
                        help="offered rates as multiples of the measured capacity")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=64,
                        help="the runtime's device adapter slots (--max-gpu-adapters)")
    parser.add_argument("--warmup-s", type=float, default=8.0)
    parser.add_argument("--probe-s", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    parser.add_argument("--plot", type=Path,
                        default=ROOT / "bench" / "results" / "load_latency.png")
    args = parser.parse_args()
    if args.quick:
        args.phase_s, args.warmup_s, args.probe_s, args.max_tokens = 7.0, 3.0, 6.0, 16
        args.multiples = "0.5,1,2,3"
    args.multiples = [float(m) for m in args.multiples.split(",")]

    from bench.multi_lora import make_adapters  # PEFT-format writer shared with that bench
    from runtime.model.builtin import ensure_builtin_model

    report: dict[str, Any] = {
        "command": "python bench/load.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "cpu_split": {name: sorted(cpus)
                                  for name, cpus in zip(("runtime", "gateway_and_client"),
                                                        split_cpus(), strict=True)},
                    "loadavg_at_start": os.getloadavg()},
        "config": {"tenants": NUM_TENANTS, "adapters": NUM_TENANTS * ADAPTERS_PER_TENANT,
                   "zipf_s": ZIPF_S, "max_tokens": args.max_tokens, "phase_s": args.phase_s,
                   "multiples": args.multiples, "warmup_s": args.warmup_s,
                   "probe_s": args.probe_s, "noisy_tenant": "t0",
                   "runtime_flags": {"max_gpu_adapters": args.slots,
                                     "max_host_adapters": NUM_TENANTS * ADAPTERS_PER_TENANT}},
        "phases": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        base = ensure_builtin_model(Path(tmp) / "models" / "builtin")
        count = NUM_TENANTS * ADAPTERS_PER_TENANT
        dirs = [path for _, path in make_adapters(base, Path(tmp) / "adapters", count)]
        stack, url = start_stack(Path(tmp) / "data", base, Path(tmp) / "stack.log",
                                 args.slots)
        try:
            procs = {"gateway": stack[0].pid, "runtime": stack[1].pid}
            catalog = Catalog()
            calm = [f"t{i}" for i in range(1, NUM_TENANTS)]
            setup_tenants(url, dirs, calm, dict.fromkeys(calm, GENEROUS), catalog)

            def set_noisy_limit(capacity: float) -> None:
                weights = zipf_weights(count)
                share = sum(weights[0::NUM_TENANTS]) / sum(weights)
                rpm = max(1, int(0.5 * share * capacity * 60))
                report["config"]["noisy_tenant_rpm"] = rpm
                report["config"]["noisy_tenant_share"] = round(share, 3)
                setup_tenants(url, dirs, ["t0"], {"t0": {"requests_per_minute": rpm,
                                                         "tokens_per_minute": 10**9}}, catalog)

            # t0's adapters are not in the catalog until after the probe: the warm-up and
            # probe draw from the other tenants' adapters only.
            catalog.by_rank = [(t, a) for t, a in catalog.by_rank if t != "t0"]
            run(drive(url, catalog, args, procs, report, set_noisy_limit))
        finally:
            stop_stack(stack)
    for name in procs:
        m = report["memory"][name]
        print(f"RSS {name}: {m.get('before_mib')} -> {m.get('end_mib')} MiB "
              f"(peak {m.get('peak_mib')}); flat: {m['flat']} "
              f"[{report['memory']['criterion']}]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
