"""Prefix caching through the API (issue 14): `loragate serve` with its own runtime on the
built-in model, two tenants, whole and streamed answers, the figures on /metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.gw_helpers import ADMIN_TOKEN, admin
from tests.support.stub_procs import start_whole_stack, stop

pytestmark = [pytest.mark.unit, pytest.mark.slow]
# Token ids (API.md: a prompt may be a list of ids): 64 shared ones, four full blocks of 16.
SHARED = [1] + [3 + (i * 37) % 900 for i in range(63)]


def tenant_key(url: str, name: str) -> str:
    assert httpx.post(f"{url}/admin/tenants", json={"name": name},
                      headers=admin()).status_code == 201
    response = httpx.post(f"{url}/admin/tenants/{name}/keys", json={"name": "ci"},
                          headers=admin())
    return str(response.json()["key"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_whole_stack(tmp_path_factory.mktemp("prefix-api") / "data", ADMIN_TOKEN)
    try:
        yield url
    finally:
        stop(proc)


def complete(url: str, key: str, prompt: list[int], **extra) -> dict:
    body = {"model": "builtin", "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()


def streamed_usage(url: str, key: str, prompt: list[int]) -> tuple[str, dict]:
    body = {"model": "builtin", "prompt": prompt, "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    text, usage = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            text += [c["text"] for c in chunk["choices"]]
            usage = chunk.get("usage") or usage
    assert usage is not None
    return "".join(text), usage


def test_cached_tokens_in_whole_and_streamed_answers_and_never_across_tenants(served) -> None:
    acme, globex = tenant_key(served, "acme"), tenant_key(served, "globex")
    cold = complete(served, acme, SHARED + [11, 12])
    assert cold["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    warm = complete(served, acme, SHARED + [13, 14])
    assert warm["usage"]["prompt_tokens"] == len(SHARED) + 2
    assert warm["usage"]["prompt_tokens_details"] == {"cached_tokens": len(SHARED)}
    # The same prompt as the warm one: the same answer, cache or not.
    uncached_like = complete(served, globex, SHARED + [13, 14])
    assert uncached_like["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert uncached_like["choices"][0]["text"] == warm["choices"][0]["text"]
    text, usage = streamed_usage(served, acme, SHARED + [13, 14])
    assert text == warm["choices"][0]["text"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": len(SHARED)}

    # The gateway's own counter, then the runtime's figures by tenant from its /stats
    # (fetched by the router's probe loop, so wait for a probe after the requests).
    deadline = time.monotonic() + 30
    while True:
        metrics = httpx.get(f"{served}/metrics").text
        runtime_line = [line for line in metrics.splitlines() if line.startswith(
            "loragate_runtime_prefix_cache_cached_tokens{") and 'tenant="acme"' in line]
        if runtime_line and float(runtime_line[0].rsplit(" ", 1)[1]) == 2 * len(SHARED):
            break
        assert time.monotonic() < deadline, "the runtime's prefix-cache figures never arrived"
        time.sleep(0.2)
    cached = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines()
              if line.startswith("loragate_tokens_in_cached_total{")}
    acme_cached = sum(v for labels, v in cached.items() if 'tenant="acme"' in labels)
    assert acme_cached == 2 * len(SHARED)
    assert not any('tenant="globex"' in labels for labels in cached)
    globex_line = [line for line in metrics.splitlines() if line.startswith(
        "loragate_runtime_prefix_cache_queried_tokens{") and 'tenant="globex"' in line]
    assert globex_line and float(globex_line[0].rsplit(" ", 1)[1]) == len(SHARED) + 2
