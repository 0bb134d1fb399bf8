"""The OpenAI surface clients send: null as the default, the developer role, one model by id,
every field we do not serve refused by name, and the sampling fields in the runtime's wire
type. Over the app in process with a stub runtime behind; the real runtime answers them in
test_openai_client.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from gateway.api.openai_format import (
    ChunkWriter,
    chat_body,
    chat_input,
    completion_body,
    completion_input,
    for_user,
    usage_of,
)
from gateway.api.schemas.openai import (
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    decode_chat,
    decode_completion,
)
from gateway.errors import BadRequest
from gateway.inference.runtime_client import Collected
from runtime.protocol import (
    FinishEvent,
    SamplingBody,
    StartEvent,
    TokenEvent,
    Usage,
    decode_generate,
)
from tests.support.gw_helpers import bearer, create_tenant, upload

pytestmark = pytest.mark.unit
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def key(gw: AsyncTestClient[Any], peft_adapter: Path) -> str:
    key = await create_tenant(gw, "acme")
    assert (await upload(gw, "acme", "support", peft_adapter)).status_code == 201
    return key


NULLABLE = ["max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
            "logprobs", "user", "n", "return_token_ids", "frequency_penalty",
            "presence_penalty", "repetition_penalty", "top_k", "min_p", "logit_bias",
            "min_tokens", "ignore_eos", "stop_token_ids", "response_format",
            *UNSUPPORTED_COMPLETION]


def sent(body: Any) -> Any:
    """The body as the runtime decodes it."""
    return decode_generate(msgspec.json.encode(body))


def test_null_means_the_default_for_every_optional_field() -> None:
    raw = msgspec.json.encode({"model": "m", "prompt": "hi", **dict.fromkeys(NULLABLE)})
    body = sent(completion_input(decode_completion(raw), "cmpl-1"))
    assert body.sampling == SamplingBody()
    chat_fields = [f for f in NULLABLE if f not in UNSUPPORTED_COMPLETION and f != "logprobs"]
    raw = msgspec.json.encode({"model": "m", "messages": CHAT, "logprobs": None,
                               "top_logprobs": None, "max_completion_tokens": None,
                               **dict.fromkeys(chat_fields), **dict.fromkeys(UNSUPPORTED_CHAT)})
    assert sent(chat_input(decode_chat(raw), "chatcmpl-1")).sampling == SamplingBody()


def test_sampling_fields_travel_to_the_runtime() -> None:
    raw = msgspec.json.encode({
        "model": "m", "prompt": "hi", "n": 3, "frequency_penalty": 0.5, "presence_penalty": -1,
        "repetition_penalty": 1.2, "top_k": 7, "min_p": 0.05, "logit_bias": {"42": -100},
        "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [5, 6], "seed": 9,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "x", "schema": {"type": "object"}}}})
    s = sent(completion_input(decode_completion(raw), "cmpl-1")).sampling
    assert (s.n, s.frequency_penalty, s.presence_penalty, s.repetition_penalty) == (3, .5, -1, 1.2)
    assert (s.top_k, s.min_p, s.logit_bias, s.min_tokens) == (7, 0.05, {42: -100.0}, 2)
    assert s.ignore_eos and s.stop_token_ids == [5, 6] and s.seed == 9
    assert s.response_format == "json_schema" and msgspec.json.decode(s.json_schema) == {
        "type": "object"}


@pytest.mark.parametrize("top_k,sent_as", [(0, -1), (-1, -1), (None, -1), (5, 5)])
def test_top_k_zero_or_minus_one_is_off(top_k: int | None, sent_as: int) -> None:
    raw = msgspec.json.encode({"model": "m", "prompt": "hi", "top_k": top_k})
    assert sent(completion_input(decode_completion(raw), "c")).sampling.top_k == sent_as


def test_developer_role_is_rendered_as_system() -> None:
    raw = msgspec.json.encode({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]})
    messages = sent(chat_input(decode_chat(raw), "chatcmpl-1")).messages
    assert [(m.role, m.content) for m in messages] == [("system", "be brief"), ("user", "hi")]


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("parallel_tool_calls", True),
    ("audio", {"voice": "alloy"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}),
    ("reasoning_effort", "low"),
])
async def test_chat_fields_not_served_are_400_naming_them(
    gw: AsyncTestClient[Any], key: str, field: str, value: Any
) -> None:
    response = await gw.post("/v1/chat/completions", headers=bearer(key),
                             json={"model": "builtin", "messages": CHAT, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_parameter", field)
    assert field in error["message"]


@pytest.mark.parametrize("field,value", [("best_of", 2), ("echo", True), ("suffix", "end")])
async def test_completion_fields_not_served_are_400_naming_them(
    gw: AsyncTestClient[Any], key: str, field: str, value: Any
) -> None:
    response = await gw.post("/v1/completions", headers=bearer(key),
                             json={"model": "builtin", "prompt": "hi", field: value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "unsupported_parameter"
    assert response.json()["error"]["param"] == field


async def test_off_values_of_unserved_fields_and_unknown_fields_pass(
    gw: AsyncTestClient[Any], key: str
) -> None:
    chat = {"model": "builtin", "messages": CHAT, "max_tokens": 2, "tools": [],
            "tool_choice": "none", "store": False, "metadata": {"a": "b"}}
    assert (await gw.post("/v1/chat/completions", json=chat, headers=bearer(key))
            ).status_code == 200
    completion = {"model": "builtin", "prompt": "hi", "max_tokens": 2, "echo": False,
                  "best_of": 1, "some_future_field": 1}
    assert (await gw.post("/v1/completions", json=completion, headers=bearer(key))
            ).status_code == 200


async def test_an_all_null_request_answers_with_the_defaults(
    gw: AsyncTestClient[Any], key: str
) -> None:
    body = {"model": "builtin", "prompt": "hi", **dict.fromkeys(NULLABLE)}
    response = await gw.post("/v1/completions", json=body, headers=bearer(key))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 16  # max_tokens' default


@pytest.mark.parametrize("field,value", [
    ("frequency_penalty", 2.5), ("presence_penalty", -3), ("repetition_penalty", 0),
    ("top_k", -2), ("min_p", 1.5), ("logit_bias", {"7": 101}), ("logit_bias", {"x": 1}),
    ("logit_bias", {"\u00b2": 1}),
    ("min_tokens", -1), ("stop_token_ids", [1] * 65),
    ("response_format", {"type": "yaml"}), ("response_format", {"type": "json_schema"}),
])
async def test_out_of_range_sampling_fields_are_400_naming_them(
    gw: AsyncTestClient[Any], key: str, field: str, value: Any
) -> None:
    response = await gw.post("/v1/completions", headers=bearer(key),
                             json={"model": "builtin", "prompt": "hi", field: value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


async def test_one_model_by_id_tenant_scoped(gw: AsyncTestClient[Any], key: str) -> None:
    card = (await gw.get("/v1/models/support", headers=bearer(key))).json()
    assert card == {"id": "support", "object": "model", "owned_by": "acme", "created": 0}
    assert (await gw.get("/v1/models/builtin", headers=bearer(key))).json()["id"] == "builtin"
    missing = await gw.get("/v1/models/nope", headers=bearer(key))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    other = await create_tenant(gw, "beta")
    hidden = await gw.get("/v1/models/support", headers=bearer(other))
    assert hidden.status_code == 404  # never another tenant's adapter
    assert (await gw.get("/v1/models/support")).status_code == 401
    # An unknown id is answered like an unknown model name: echoed only in part.
    long = await gw.get("/v1/models/" + "x" * 2000, headers=bearer(key))
    assert long.status_code == 404 and len(long.json()["error"]["message"]) < 200


def test_n_choices_are_indexed_whole_and_streamed_with_usage_summed() -> None:
    events = [StartEvent(prompt_tokens=4), TokenEvent([7], " a", None, 1),
              TokenEvent([5], " b", None, 0), TokenEvent([8], " c", None, 1),
              FinishEvent("length", Usage(4, 1), 0), FinishEvent("stop", Usage(4, 2), 1)]
    got = Collected()
    for event in events:
        got.add(event)
    whole = completion_body("cmpl-1", "m", got, logprobs=False, token_ids=True, n=2)
    assert [(c.index, c.text, c.finish_reason, c.token_ids) for c in whole.choices] == [
        (0, " b", "length", [5]), (1, " a c", "stop", [7, 8])]
    assert whole.usage == usage_of(got) and (whole.usage.prompt_tokens,
                                             whole.usage.completion_tokens) == (4, 3)
    chat = chat_body("chatcmpl-1", "m", got, logprobs=False, token_ids=False, n=3)
    assert [c.message.content for c in chat.choices] == [" b", " a c", ""]  # 3rd: nothing came
    writer = ChunkWriter("chatcmpl-1", "m", chat=True, logprobs=False, token_ids=False, n=2)
    frames = [writer.role(), *(writer.token(e) for e in events[1:4]),
              writer.finish("stop", 1)]
    chunks = [json.loads(part.removeprefix(b"data: ")) for frame in frames
              for part in frame.split(b"\n\n") if part]
    roles = [c["choices"][0]["index"] for c in chunks if "role" in c["choices"][0]["delta"]]
    assert roles == [0, 1]
    texts: dict[int, str] = {}
    for c in chunks:
        choice = c["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["delta"].get(
            "content", "")
    assert texts == {0: " b", 1: " a c"} and chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("message,code,param", [
    ("sampling: frequency_penalty and presence_penalty must be between -2 and 2",
     "invalid_request", "frequency_penalty"),
    ("sampling: min_tokens must be between 0 and max_tokens", "invalid_request", "min_tokens"),
    ("sampling: logit_bias and stop_token_ids take token ids between 0 and 99",
     "invalid_request", "logit_bias"),
    ("response_format: the JSON schema is not supported: Invalid type: objectx",
     "invalid_request", "response_format"),
    ("this model's maximum context length is 32 tokens, but 40 were requested",
     "context_length_exceeded", "messages"),
])
def test_runtime_refusals_of_the_new_fields_name_the_users_field(
    message: str, code: str, param: str
) -> None:
    chat = decode_chat(msgspec.json.encode({"model": "m", "messages": CHAT}))
    mapped = for_user(BadRequest(message, code=code), chat)
    assert (mapped.param, mapped.code) == (param, code)
