"""The runtime server end to end on the real engine and the built-in model.

- greedy tokens over HTTP equal transformers' `generate` on the same weights;
- a client that disconnects mid-stream leaves no running request and no used KV block;
- `serve()` in a subprocess: SIGTERM during a generation lets it finish, refuses new work with
  503, deregisters from Redis and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn
from litestar.testing import AsyncTestClient

from runtime.config import RuntimeConfig
from runtime.http.registry import runtime_key

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_app(model_dir: Path):
    from runtime.http.app import create_runtime_app
    from runtime.http.process import build_front  # the same wiring as serve()

    loaded = build_front(RuntimeConfig(model_dir=model_dir, max_running=4))
    app = create_runtime_app(loaded.front, tokenizer=loaded.tokenizer, info=loaded.info)
    return loaded.front, app


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.slow
async def test_greedy_stream_matches_transformers(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    prompt = "The cache keeps the hot adapters"
    prompt_ids = AutoTokenizer.from_pretrained(str(model_dir))(prompt)["input_ids"]
    _front, app = build_app(model_dir)
    async with AsyncTestClient(app) as client:
        health = (await client.get("/health")).json()
        assert health["status"] == "ok" and health["max_model_len"] == 2048
        body = {"request_id": "e2e-1", "prompt": prompt,
                "sampling": {"max_tokens": 12, "temperature": 0, "ignore_eos": True,
                             "logprobs": 1}}
        resp = await client.post("/generate", json=body)
        events = [json.loads(line) for line in resp.text.splitlines()]
    assert events[0] == {"type": "start", "prompt_tokens": len(prompt_ids)}
    tokens = [t for e in events if e["type"] == "token" for t in e["token_ids"]]
    assert tokens == hf_greedy(model_dir, prompt_ids, 12)
    assert events[-1] == {"type": "finish", "finish_reason": "length",
                          "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": 12}}
    first = next(e for e in events if e["type"] == "token")["logprobs"][0]
    assert first["token_id"] == tokens[0] and first["top"][0]["token_id"] == tokens[0]


@pytest.mark.unit
async def test_each_request_is_checked_once_on_its_way_to_the_engine(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.protocol import RequestLimits

    checked: list[str] = []
    real_check = RequestLimits.check

    def counting_check(self: RequestLimits, req) -> None:
        checked.append(req.request_id)
        real_check(self, req)

    monkeypatch.setattr(RequestLimits, "check", counting_check)
    _front, app = build_app(model_dir)
    body = {"request_id": "once", "prompt": "one check", "sampling": {"max_tokens": 2}}
    async with AsyncTestClient(app) as client:
        events = [json.loads(line) for line in
                  (await client.post("/generate", json=body)).text.splitlines()]
        refused = await client.post("/generate", json={**body, "request_id": "long",
                                                       "prompt_token_ids": [1] * 2048,
                                                       "prompt": None})
    assert events[-1]["type"] == "finish"
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "prompt_too_long"
    assert checked == ["once", "long"]  # not again in the async front or the engine


async def wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_disconnect_frees_the_engine(model_dir: Path) -> None:
    front, app = build_app(model_dir)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: server.started)
        body = {"request_id": "gone", "prompt_token_ids": [1, 40, 41],
                "sampling": {"max_tokens": 2000, "ignore_eos": True}}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            async with http.stream("POST", "/generate", json=body) as resp:
                lines = resp.aiter_lines()
                assert json.loads(await anext(lines))["type"] == "start"
                assert json.loads(await anext(lines))["type"] == "token"
                assert front.stats()["num_running"] == 1

            def idle() -> bool:
                s = front.stats()
                return (s["num_running"], s["num_waiting"]) == (0, 0) and (
                    s["kv_blocks_free"] == s["kv_blocks_total"]
                )

            await wait_for(idle)
            # The server still serves after the abort.
            ok = await http.post("/generate", json={**body, "request_id": "next",
                                                    "sampling": {"max_tokens": 2}})
            assert ok.text.splitlines()[-1].startswith('{"type":"finish"')
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)


SERVE_SCRIPT = """
import logging, sys
from pathlib import Path
from runtime.config import RuntimeConfig
from runtime.http.process import serve
logging.basicConfig(level=logging.INFO)
serve(RuntimeConfig(model_dir=Path(sys.argv[1]), max_running=4), "127.0.0.1", int(sys.argv[2]),
      sys.argv[3], public_url=sys.argv[4])
"""


@pytest.mark.slow
@pytest.mark.integration
def test_sigterm_drains_deregisters_and_exits_zero(
    model_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    key = runtime_key(url)
    log_path = tmp_path / "runtime.log"  # a file, not a pipe nobody drains while we wait
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE_SCRIPT, str(model_dir), str(port), redis_url, url],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    store = redis.Redis.from_url(redis_url)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            deadline = time.monotonic() + 120
            while True:  # poll until the model is loaded (readiness, not a timing assert)
                assert proc.poll() is None, log_path.read_text()
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "runtime never became healthy"
                time.sleep(0.1)
            assert json.loads(store.get(key))["url"] == url

            body = {"request_id": "long", "prompt_token_ids": [1, 50, 51],
                    "sampling": {"max_tokens": 1000, "ignore_eos": True}}
            with http.stream("POST", "/generate", json=body) as resp:
                lines = resp.iter_lines()
                assert json.loads(next(lines))["type"] == "start"
                assert json.loads(next(lines))["type"] == "token"
                proc.send_signal(signal.SIGTERM)
                with httpx.Client(base_url=url, timeout=30) as other:
                    deadline = time.monotonic() + 30
                    while (health := other.get("/health")).json()["status"] != "draining":
                        assert time.monotonic() < deadline
                        time.sleep(0.02)
                    assert health.status_code == 503
                    refused = other.post("/generate", json={**body, "request_id": "late"})
                    assert refused.status_code == 503 and "retry-after" in refused.headers
                rest = [json.loads(line) for line in lines if line]
            finish = rest[-1]
            assert finish["type"] == "finish" and finish["finish_reason"] == "length"
            assert finish["usage"]["completion_tokens"] == 1000
            tokens = 1 + sum(len(e["token_ids"]) for e in rest if e["type"] == "token")
            assert tokens == 1000
        assert proc.wait(timeout=60) == 0, log_path.read_text()
        assert store.exists(key) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        store.close()


@pytest.mark.unit
def test_public_url_for_a_wildcard_bind_names_the_host() -> None:
    from runtime.http.process import public_url_for

    assert public_url_for("127.0.0.1", 8100) == "http://127.0.0.1:8100"
    assert public_url_for("::1", 8100) == "http://[::1]:8100"
    wildcard = public_url_for("0.0.0.0", 8100)
    assert wildcard.endswith(":8100") and "0.0.0.0" not in wildcard


@pytest.mark.unit
def test_serve_raises_when_the_model_cannot_load(tmp_path: Path) -> None:
    from runtime.http.process import serve

    (tmp_path / "config.json").write_text("{}")  # no weights, no tokenizer
    with pytest.raises(RuntimeError, match="failed to start"):
        serve(RuntimeConfig(model_dir=tmp_path), "127.0.0.1", free_port(), None)
