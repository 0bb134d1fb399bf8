"""The official `openai` client against a live `loragate serve` on 127.0.0.1, streaming and not:
over the stub runtime, and over the real runtime on the built-in model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.gw_helpers import ADMIN_TOKEN, admin
from tests.support.stub_procs import start_gateway, start_stub, start_whole_stack, stop


def tenant_key(url: str) -> str:
    assert httpx.post(f"{url}/admin/tenants", json={"name": "acme"},
                      headers=admin()).status_code == 201
    response = httpx.post(f"{url}/admin/tenants/acme/keys", json={"name": "ci"}, headers=admin())
    return str(response.json()["key"])


@pytest.fixture
def live_stub_gateway(tmp_path: Path, base_model_dir: Path) -> Iterator[str]:
    runtime, runtime_url = start_stub()
    gateway, url = start_gateway(tmp_path / "data", base_model_dir, [runtime_url], ADMIN_TOKEN)
    try:
        yield url
    finally:
        stop(gateway)
        stop(runtime)


@pytest.mark.unit
def test_openai_client_over_stub_runtime(live_stub_gateway: str) -> None:
    client = openai.OpenAI(base_url=f"{live_stub_gateway}/v1", api_key=tenant_key(
        live_stub_gateway), max_retries=0)
    assert "builtin" in {m.id for m in client.models.list()}
    whole = client.completions.create(model="builtin", prompt="a b", max_tokens=3, logprobs=1)
    assert whole.choices[0].text == " w0 w1 w2"
    assert whole.usage is not None and whole.usage.completion_tokens == 3
    assert whole.choices[0].logprobs is not None
    assert whole.choices[0].logprobs.tokens == [" w0", " w1", " w2"]
    streamed = client.completions.create(model="builtin", prompt="a b", max_tokens=3, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == " w0 w1 w2"
    chat = client.chat.completions.create(model="builtin", max_tokens=2,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == " w0 w1"
    chunks = client.chat.completions.create(model="builtin", max_tokens=2, stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " w0 w1"
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="builtin", prompt="x", temperature=3)


@pytest.mark.slow
@pytest.mark.unit
def test_openai_client_over_the_real_runtime(tmp_path: Path) -> None:
    """`loragate serve` with no --runtimes: the whole system, the built-in model, one command."""
    proc, url = start_whole_stack(tmp_path / "data", ADMIN_TOKEN)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=tenant_key(url), max_retries=0)
        whole = client.completions.create(model="builtin", prompt="The", max_tokens=5,
                                          temperature=0, extra_body={"return_token_ids": True})
        streamed = client.completions.create(model="builtin", prompt="The", max_tokens=5,
                                             temperature=0, stream=True)
        text = "".join(c.choices[0].text for c in streamed if c.choices)
        assert whole.usage is not None and whole.usage.completion_tokens >= 1
        assert text == whole.choices[0].text  # greedy: the same tokens either way
        extra = whole.choices[0].model_extra or {}
        assert len(extra["token_ids"]) == whole.usage.completion_tokens
        chat = client.chat.completions.create(
            model="builtin", max_tokens=4, temperature=0,
            messages=[{"role": "user", "content": "hello"}])
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert chat.usage is not None and chat.usage.prompt_tokens > 1
        metrics = httpx.get(f"{url}/metrics").text  # no key: /metrics is open (API.md)
        assert 'loragate_requests_total{adapter="base",status="200",tenant="acme"' in metrics
        assert "loragate_runtime_adapters_resident{" in metrics  # from the runtime's /stats
    finally:
        stop(proc)
