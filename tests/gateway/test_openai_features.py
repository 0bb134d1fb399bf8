"""Around the answer: shadow copies, A/B headers, /metrics, 429, disconnects, the registry."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from tests.support.gw_helpers import (
    ADMIN_TOKEN,
    admin,
    bearer,
    create_tenant,
    upload,
)
from tests.support.stub_procs import start_gateway, start_stub, stop

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    """A stub that takes 50 ms a token, so streams are still open while tests look (the
    conftest's `gw` runs over it)."""
    proc, url = start_stub(token_delay_ms=50)
    yield url
    stop(proc)


async def poll(check: Any, timeout_s: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def test_shadow_copy_is_recorded_after_the_primary_and_never_returned(
    gw: AsyncTestClient[Any], peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    key = await create_tenant(gw, "acme")
    await upload(gw, "acme", "a", peft_adapter)
    await upload(gw, "acme", "b", peft_adapter_v2)
    experiment = {"variants": [{"name": "only", "adapter": "a", "weight": 1}],
                  "shadow": {"adapter": "b", "sample_rate": 1.0}}
    assert (await gw.put("/admin/tenants/acme/experiments/exp", json=experiment,
                         headers=admin())).status_code == 200
    response = await gw.post("/v1/completions", headers={**bearer(key), "X-User-Id": "u1"},
                             json={"model": "exp", "prompt": "p", "max_tokens": 2})
    assert response.status_code == 200
    assert response.headers["x-loragate-adapter"] == "a@1"
    assert response.headers["x-loragate-variant"] == "only"

    async def shadow_figures() -> Any:
        got = (await gw.get("/admin/tenants/acme/experiments/exp", headers=admin())).json()
        return got["shadow"].get("figures")

    figures = await poll(shadow_figures)
    assert figures["requests"] == 1 and figures["errors"] == 0
    assert figures["identical_share"] == 1.0  # the stub answers the same text for both
    assert figures["tokens_out"] == 2


async def test_metrics_count_requests_without_auth(gw: AsyncTestClient[Any]) -> None:
    key = await create_tenant(gw, "acme")
    await gw.post("/v1/completions", json={"model": "builtin", "prompt": "p", "max_tokens": 1},
                  headers=bearer(key))

    async def counted() -> bool:
        text = (await gw.get("/metrics")).text
        return 'loragate_requests_total{adapter="base",status="200",tenant="acme"' in text

    assert await poll(counted)
    text = (await gw.get("/metrics")).text
    assert "loragate_tokens_out_total" in text and "loragate_runtime_adapter_hits" in text


async def test_over_the_limit_is_429_with_retry_after(gw: AsyncTestClient[Any]) -> None:
    assert (await gw.post("/admin/tenants", json={"name": "tiny", "requests_per_minute": 2},
                          headers=admin())).status_code == 201
    key = (await gw.post("/admin/tenants/tiny/keys", json={"name": "k"},
                         headers=admin())).json()["key"]
    body = {"model": "builtin", "prompt": "p", "max_tokens": 1}
    codes = [(await gw.post("/v1/completions", json=body, headers=bearer(key))) for _ in range(4)]
    assert [c.status_code for c in codes] == [200, 200, 429, 429]
    assert int(codes[2].headers["retry-after"]) >= 1
    assert codes[2].json()["error"]["code"] == "rate_limit_exceeded"


def test_client_disconnect_aborts_the_runtime_stream(
    tmp_path: Path, base_model_dir: Path, stub_url: str
) -> None:
    """Over a live gateway process: the test client of Litestar does not stream for real."""
    gateway, url = start_gateway(tmp_path / "data", base_model_dir, [stub_url], ADMIN_TOKEN)
    try:
        httpx.post(f"{url}/admin/tenants", json={"name": "acme"}, headers=admin())
        key = httpx.post(f"{url}/admin/tenants/acme/keys", json={"name": "k"},
                         headers=admin()).json()["key"]
        body = {"model": "builtin", "prompt": "p", "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=bearer(key),
                          timeout=30) as response:
            # Held in a name: a generator abandoned by `break` is finalized at once, and
            # httpcore closes the connection then: the client would leave before the check.
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    assert json.loads(line[6:])["choices"][0]["text"]
                    break
            assert httpx.get(f"{stub_url}/stats").json()["num_streams"] == 1
        deadline = time.monotonic() + 5
        while httpx.get(f"{stub_url}/stats").json()["num_streams"] != 0:
            assert time.monotonic() < deadline, "the runtime still streams for a client that left"
            time.sleep(0.05)
    finally:
        stop(gateway)


@pytest.mark.integration
async def test_runtimes_come_from_the_redis_registry(redis_url: str, stub_url: str) -> None:
    import redis.asyncio as aioredis

    from gateway.inference.router import Router

    client = aioredis.from_url(redis_url)
    try:
        await client.set(f"loragate:runtime:{stub_url}", json.dumps({"url": stub_url}), ex=15)
        async with httpx.AsyncClient() as http:
            router = Router(http, (), client)
            await router.refresh()
            assert [s.url for s in router.runtimes.values() if s.healthy] == [stub_url]
            await client.delete(f"loragate:runtime:{stub_url}")
            await router.refresh()
            assert router.runtimes == {}
    finally:
        await client.aclose()
