"""A real runtime SIGKILLed while it streams: the client gets a clean error, nothing hangs.

Two `loragate runtime` processes over the built-in model behind one `loragate serve
--runtimes url1,url2`. Two long requests for the same adapter (rendezvous hashing puts them
on the same runtime), one streamed and one not, are running when that runtime is killed:
the stream ends with an OpenAI-shaped `data: {"error": ...}` event and `data: [DONE]`, the
whole answer is a 503 OpenAI error body; the gateway stays up, the next requests (streamed
and not) are served by the survivor, and the router reports the dead runtime not ready.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.support.fault_procs import (
    Proc,
    new_tenant,
    start_gateway,
    start_runtimes,
    upload,
    wait_until,
)
from tests.support.gw_helpers import bearer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Greedy and long: the greedy continuation of this prompt (built-in model, with or without
# the seed-0 test adapter) does not reach EOS within the limit, so the answer is still
# streaming (seconds of decoding) when the runtime is killed right after the first chunk.
LONG = {"prompt": "Once upon a time", "max_tokens": 1800, "temperature": 0}


def streams_open(runtime: Proc) -> int:
    try:
        return int(httpx.get(f"{runtime.url}/stats", timeout=5).json()["num_streams"])
    except httpx.HTTPError:
        return -1


def data_lines(lines: Iterator[str]) -> Iterator[str]:
    return (line.removeprefix("data: ") for line in lines if line.startswith("data: "))


def test_runtime_killed_mid_stream(tmp_path: Path, base_model_dir: Path,
                                   peft_adapter: Path) -> None:
    with ExitStack() as stack:
        runtimes = start_runtimes(base_model_dir, [tmp_path / f"runtime{i}.log" for i in (0, 1)],
                                  artifacts_dir=tmp_path / "data" / "artifacts")
        for runtime in runtimes:
            stack.callback(runtime.stop)
        gateway = start_gateway(tmp_path / "data", base_model_dir, [r.url for r in runtimes],
                                tmp_path / "gateway.log")
        stack.callback(gateway.stop)

        def both_ready() -> bool:
            seen = httpx.get(f"{gateway.url}/readyz").json()["runtimes"]
            return len(seen) == 2 and all(r["ready"] for r in seen)

        wait_until(both_ready, "the router to see both runtimes ready", timeout_s=60)
        tenant, key = new_tenant(gateway.url)
        assert upload(gateway.url, tenant, "support", peft_adapter).status_code == 201
        url, auth = f"{gateway.url}/v1/completions", bearer(key)

        pool = stack.enter_context(ThreadPoolExecutor(1))
        whole = pool.submit(httpx.post, url, headers=auth, timeout=120,
                            json={"model": "support", **LONG})
        serving = wait_until(lambda: [r for r in runtimes if streams_open(r) > 0],
                             "the whole-answer request to reach a runtime")[0]
        survivor = next(r for r in runtimes if r is not serving)
        with httpx.stream("POST", url, headers=auth, timeout=120,
                          json={"model": "support", "stream": True, **LONG}) as stream:
            assert stream.status_code == 200
            assert stream.headers["x-loragate-adapter"] == "support@1"
            chunks = data_lines(stream.iter_lines())
            first = json.loads(next(chunks))
            assert first["choices"][0]["finish_reason"] is None
            assert streams_open(serving) == 2, "both requests must be on the runtime killed"
            serving.kill()
            rest = list(chunks)  # returns only because the stream ends: no hang

        # The stream: maybe more tokens that were in flight, then one error event, then DONE.
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])
        assert set(error) == {"error"}
        assert error["error"]["code"] == "runtime_failed"
        assert error["error"]["type"] == "server_error"
        assert error["error"]["message"] and error["error"]["param"] is None
        for chunk in map(json.loads, rest[:-2]):
            assert chunk["choices"][0]["finish_reason"] is None  # never a fake "length"

        # The whole answer: an OpenAI error body with a 5xx, not a hang and not a 200.
        answer = whole.result(timeout=120)
        assert answer.status_code in (502, 503), answer.text
        assert answer.json()["error"]["code"] == "runtime_failed"
        assert set(answer.json()["error"]) == {"message", "type", "code", "param"}

        assert httpx.get(f"{gateway.url}/healthz").status_code == 200
        assert gateway.alive()

        # The next requests, both kinds, adapter and base model, go to the survivor.
        before = streams_open(survivor)
        assert before == 0
        for model in ("support", "builtin"):
            done = httpx.post(url, headers=auth, timeout=60,
                              json={"model": model, "prompt": "hi", "max_tokens": 8})
            assert done.status_code == 200, done.text
            assert done.json()["usage"]["completion_tokens"] >= 1
            with httpx.stream("POST", url, headers=auth, timeout=60,
                              json={"model": model, "prompt": "hi", "max_tokens": 8,
                                    "stream": True}) as again:
                assert again.status_code == 200
                streamed = list(data_lines(again.iter_lines()))
            assert streamed[-1] == "[DONE]"
            assert not any("error" in json.loads(c) for c in streamed[:-1])
            assert json.loads(streamed[-2])["choices"][0]["finish_reason"] in ("length", "stop")
        survivor_stats = httpx.get(f"{survivor.url}/stats").json()
        assert survivor_stats["adapters"]["loads"] >= 1  # it loaded the adapter to serve it

        # The router's view: the dead runtime is reported not ready, the survivor ready.
        def dead_reported() -> dict[str, bool] | None:
            ready = httpx.get(f"{gateway.url}/readyz")
            states = {r["url"]: r["ready"] for r in ready.json()["runtimes"]}
            return states if ready.status_code == 200 and not states[serving.url] else None

        states = wait_until(dead_reported, "the router to mark the dead runtime", timeout_s=30)
        assert states == {serving.url: False, survivor.url: True}
    # No request was answered with a 500 (the 503 above is logged with its trace by design).
    assert '" 500' not in gateway.log_tail(100_000), gateway.log_tail()
