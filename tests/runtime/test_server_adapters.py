"""Adapters over HTTP on the real engine: a PEFT adapter and the base model in one batch give
PEFT's greedy tokens; a mismatched artifact fails only its request, with adapter_load_failed.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from runtime.config import RuntimeConfig
from runtime.types import adapter_key


def build_app(model_dir: Path):
    from runtime.http.app import create_runtime_app
    from runtime.http.process import build_front  # the same wiring as serve(), LoRA included

    loaded = build_front(RuntimeConfig(model_dir=model_dir, max_running=4, max_lora_rank=16))
    app = create_runtime_app(loaded.front, tokenizer=loaded.tokenizer, info=loaded.info)
    return loaded.front, app


def adapter_body(ref) -> dict:
    return {"key": ref.key, "sha256": ref.sha256, "uri": ref.uri, "rank": ref.rank,
            "alpha": ref.alpha, "target_modules": list(ref.target_modules),
            "use_rslora": ref.use_rslora, "name": ref.name}


@pytest.mark.slow
async def test_adapter_and_base_requests_over_http_match_peft(model_dir: Path, tmp_path) -> None:
    from tests.support.lora_oracle import SPECS, load_peft_multi, make_peft_adapter, peft_greedy

    spec = SPECS[4]  # q/v, rank 8
    ref = make_peft_adapter(model_dir, tmp_path / spec.name, spec)
    peft_model = load_peft_multi(model_dir, {spec.name: tmp_path / spec.name})
    prompt = [1, 300, 301, 302, 77]
    want_adapter, _ = peft_greedy(peft_model, prompt, spec.name, 6)
    want_base, _ = peft_greedy(peft_model, prompt, None, 6)
    assert want_adapter != want_base  # otherwise the test could not tell them apart

    _front, app = build_app(model_dir)
    sampling = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}

    async def tokens(client, request_id: str, adapter: dict | None) -> list[dict]:
        body = {"request_id": request_id, "prompt_token_ids": prompt, "sampling": sampling,
                "adapter": adapter}
        resp = await client.post("/generate", json=body)
        return [json.loads(line) for line in resp.text.splitlines()]

    async with AsyncTestClient(app) as client:
        with_adapter, base = await asyncio.gather(
            tokens(client, "with-adapter", adapter_body(ref)), tokens(client, "base", None)
        )
        # The right URI under the wrong hash: the fetch is refused, the request fails alone.
        wrong = "0" * 64
        bad = adapter_body(ref) | {"sha256": wrong, "name": "acme/bad@1", "key": adapter_key(
            wrong, ref.rank, ref.alpha, ref.use_rslora, ref.target_modules)}
        failed = await tokens(client, "bad", bad)
        stats = (await client.get("/stats")).json()
        after = await tokens(client, "after", None)
    assert [t for e in with_adapter if e["type"] == "token" for t in e["token_ids"]] == (
        want_adapter
    )
    assert [t for e in base if e["type"] == "token" for t in e["token_ids"]] == want_base
    assert failed[-1]["type"] == "error" and failed[-1]["code"] == "adapter_load_failed"
    assert "acme/bad@1" in failed[-1]["message"]
    assert stats["adapters"]["loads"] >= 1 and stats["adapters"]["resident"]["device"] >= 1
    assert after[-1]["type"] == "finish"
