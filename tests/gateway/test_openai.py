"""The OpenAI-compatible routes over the app in process, with a stub runtime process behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from gateway.api.openai_format import chat_input, completion_input
from gateway.api.schemas.openai import DEFAULT_MAX_TOKENS, decode_chat, decode_completion
from runtime.protocol import decode_generate
from tests.support.gw_helpers import admin, bearer, create_tenant, upload

pytestmark = pytest.mark.unit


@pytest.fixture
async def key(gw: AsyncTestClient[Any], peft_adapter: Path) -> str:
    key = await create_tenant(gw, "acme")
    assert (await upload(gw, "acme", "support", peft_adapter)).status_code == 201
    return key


async def test_completion_whole_answer_with_usage_token_ids_and_logprobs(
    gw: AsyncTestClient[Any], key: str
) -> None:
    body = {"model": "builtin", "prompt": "one two three", "max_tokens": 3, "logprobs": 2,
            "return_token_ids": True}
    response = await gw.post("/v1/completions", json=body, headers=bearer(key))
    assert response.status_code == 200, response.text
    answer = response.json()
    choice = answer["choices"][0]
    assert answer["object"] == "text_completion" and answer["model"] == "builtin"
    assert choice["text"] == " w0 w1 w2"
    assert choice["token_ids"] == [100, 101, 102]
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == [" w0", " w1", " w2"]
    assert choice["logprobs"]["text_offset"] == [0, 3, 6]
    assert all(len(top) == 2 for top in choice["logprobs"]["top_logprobs"])
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7,
                               "prompt_tokens_details": {"cached_tokens": 0}}
    assert "x-loragate-adapter" not in response.headers


async def test_adapter_answer_names_the_version_and_streams_sse(
    gw: AsyncTestClient[Any], key: str
) -> None:
    body = {"model": "support", "prompt": [5, 6], "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    response = await gw.post("/v1/completions", json=body, headers=bearer(key))
    assert response.status_code == 200, response.text
    assert response.headers["x-loragate-adapter"] == "support@1"
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == " w0 w1"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["prompt_tokens"] == 2


async def test_chat_whole_and_streamed(gw: AsyncTestClient[Any], key: str) -> None:
    body = {"model": "support@1", "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": 2, "logprobs": True, "top_logprobs": 1}
    answer = (await gw.post("/v1/chat/completions", json=body, headers=bearer(key))).json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": " w0 w1"}
    assert [e["token"] for e in answer["choices"][0]["logprobs"]["content"]] == [" w0", " w1"]
    response = await gw.post("/v1/chat/completions", json={**body, "stream": True},
                             headers=bearer(key))
    chunks = [json.loads(x.removeprefix("data: ")) for x in response.text.split("\n\n")
              if x and x != "data: [DONE]"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == " w0 w1"


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", 2.5),
                                         ("top_p", 0), ("logprobs", 6), ("n", 17),
                                         ("prompt", [])])
async def test_out_of_range_fields_are_400_in_openai_shape(
    gw: AsyncTestClient[Any], key: str, field: str, value: Any
) -> None:
    body = {"model": "builtin", "prompt": "hi", field: value}
    response = await gw.post("/v1/completions", json=body, headers=bearer(key))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field


def test_bounds_the_runtime_owns_travel_to_it_in_its_own_wire_type() -> None:
    # A token id past the vocabulary, a max_tokens past the context and a negative seed are
    # the runtime's to refuse (it answers 400 itself): the gateway does not restate them.
    raw = b'{"model": "m", "prompt": [70000, -1], "max_tokens": 2000000, "seed": -5}'
    body = completion_input(decode_completion(raw), "cmpl-1")
    sent = decode_generate(msgspec.json.encode(body))
    assert sent.request_id == "cmpl-1" and sent.prompt_token_ids == [70000, -1]
    assert (sent.sampling.max_tokens, sent.sampling.seed) == (2000000, -5)
    chat = decode_chat(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    sent = decode_generate(msgspec.json.encode(chat_input(chat, "chatcmpl-1")))
    assert sent.messages is not None and sent.messages[0].content == "hi"
    assert sent.sampling.max_tokens == DEFAULT_MAX_TOKENS


async def test_unknown_model_is_404_model_not_found(gw: AsyncTestClient[Any], key: str) -> None:
    response = await gw.post("/v1/completions", json={"model": "nope", "prompt": "x"},
                             headers=bearer(key))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


async def test_promote_takes_effect_at_once_on_this_gateway(
    gw: AsyncTestClient[Any], key: str, peft_adapter_v2: Path
) -> None:
    body = {"model": "support", "prompt": "x", "max_tokens": 1}
    first = await gw.post("/v1/completions", json=body, headers=bearer(key))
    assert first.headers["x-loragate-adapter"] == "support@1"  # now cached
    assert (await upload(gw, "acme", "support", peft_adapter_v2)).status_code == 201
    activate = await gw.post("/admin/tenants/acme/adapters/support/activate",
                             json={"version": 2}, headers=admin())
    assert activate.status_code == 200
    again = await gw.post("/v1/completions", json=body, headers=bearer(key))
    assert again.headers["x-loragate-adapter"] == "support@2"


async def test_models_lists_base_adapters_and_experiments(
    gw: AsyncTestClient[Any], key: str
) -> None:
    experiment = {"variants": [{"name": "a", "adapter": "support", "weight": 1}]}
    await gw.put("/admin/tenants/acme/experiments/exp", json=experiment, headers=admin())
    ids = {m["id"] for m in (await gw.get("/v1/models", headers=bearer(key))).json()["data"]}
    assert ids == {"builtin", "support", "exp"}


async def test_a_tenant_adapter_named_like_the_base_model_wins(
    gw: AsyncTestClient[Any], key: str, peft_adapter: Path
) -> None:
    assert (await upload(gw, "acme", "builtin", peft_adapter)).status_code == 201
    response = await gw.post("/v1/completions", json={"model": "builtin", "prompt": "x",
                                                       "max_tokens": 1}, headers=bearer(key))
    assert response.headers["x-loragate-adapter"] == "builtin@1"
    other = await create_tenant(gw, "beta")
    response = await gw.post("/v1/completions", json={"model": "builtin", "prompt": "x",
                                                       "max_tokens": 1}, headers=bearer(other))
    assert response.status_code == 200 and "x-loragate-adapter" not in response.headers
