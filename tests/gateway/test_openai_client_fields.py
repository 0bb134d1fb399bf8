"""The official `openai` client using every served field against a live `loragate serve` on the
real SmolLM2 checkpoint (no --runtimes: the runtime starts with it), and the fields we do
not serve refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.support.gw_helpers import ADMIN_TOKEN, admin
from tests.support.stub_procs import ROOT, free_port, stop, wait_http

MODEL_DIR = ROOT / ".cache" / "smollm2-135m-instruct"
pytestmark = [
    pytest.mark.unit, pytest.mark.slow, pytest.mark.real_model,
    pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(),
                       reason="the SmolLM2 checkpoint is not in .cache/smollm2-135m-instruct"),
]
ASK = [{"role": "user", "content": "Tell me about cats and dogs."}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer"}}}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, str]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_")}
    env["LORAGATE_ADMIN_TOKEN"] = ADMIN_TOKEN
    data = tmp_path_factory.mktemp("live") / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--data-dir",
         str(data), "--device", "cpu", "--base-model", str(MODEL_DIR)], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc, timeout_s=120)
        deadline = time.monotonic() + 180
        while httpx.get(f"{url}/readyz", timeout=2).status_code != 200:
            assert time.monotonic() < deadline, "gateway never became ready"
            time.sleep(0.2)
        assert httpx.post(f"{url}/admin/tenants", json={"name": "acme"},
                          headers=admin()).status_code == 201
        key = httpx.post(f"{url}/admin/tenants/acme/keys", json={"name": "ci"},
                         headers=admin()).json()["key"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
        base = next(m.id for m in client.models.list() if m.owned_by == "loragate")
        yield client, base
    finally:
        stop(proc)


def chat(client: openai.OpenAI, model: str, **kw: Any) -> Any:
    kw.setdefault("messages", ASK)
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, **kw)


def test_nulls_developer_role_and_one_model_by_id(live: tuple[openai.OpenAI, str]) -> None:
    client, base = live
    assert client.models.retrieve(base).id == base
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    answer = chat(client, base, messages=[{"role": "developer", "content": "Be brief."}, *ASK],
                  logprobs=None, top_p=None, seed=None, stop=None, n=None,
                  extra_body={"temperature": None, "top_k": None, "min_p": None,
                              "repetition_penalty": None, "min_tokens": None})
    assert answer.choices[0].message.content and answer.usage.completion_tokens >= 1


def test_penalties_change_the_answer_and_each_is_served(live: tuple[openai.OpenAI, str]) -> None:
    client, base = live
    plain = chat(client, base, max_tokens=40).choices[0].message.content
    for extra in ({"frequency_penalty": 1.5}, {"presence_penalty": 2.0}):
        assert chat(client, base, max_tokens=40, **extra).choices[0].message.content != plain
    repeated = chat(client, base, max_tokens=40, extra_body={"repetition_penalty": 1.5})
    assert repeated.choices[0].message.content != plain
    # Sampling at temperature 1 with top_k 1, or min_p 1, leaves only the best token: greedy.
    for body in ({"top_k": 1}, {"min_p": 1.0}):
        got = chat(client, base, max_tokens=40, temperature=1.0, seed=3, extra_body=body)
        assert got.choices[0].message.content == plain, body
    first = client.completions.create(model=base, prompt="One, two,", max_tokens=1,
                                      temperature=0, extra_body={"return_token_ids": True})
    banned = first.choices[0].model_extra["token_ids"][0]
    biased = client.completions.create(model=base, prompt="One, two,", max_tokens=1,
                                       temperature=0, logit_bias={str(banned): -100},
                                       extra_body={"return_token_ids": True})
    assert biased.choices[0].model_extra["token_ids"][0] != banned


def test_min_tokens_ignore_eos_and_stop_token_ids(live: tuple[openai.OpenAI, str]) -> None:
    client, base = live
    short = chat(client, base, max_tokens=60,
                 messages=[{"role": "user", "content": "Say only the word yes."}])
    assert short.choices[0].finish_reason == "stop"
    n = short.usage.completion_tokens
    longer = chat(client, base, max_tokens=60, extra_body={"min_tokens": n + 5},
                  messages=[{"role": "user", "content": "Say only the word yes."}])
    assert longer.usage.completion_tokens >= n + 5
    forced = chat(client, base, max_tokens=n + 8, extra_body={"ignore_eos": True},
                  messages=[{"role": "user", "content": "Say only the word yes."}])
    assert forced.usage.completion_tokens == n + 8 and forced.choices[0].finish_reason == "length"
    ids = chat(client, base, extra_body={"return_token_ids": True}).choices[0].model_extra
    stop_id = ids["token_ids"][4]
    stopped = chat(client, base, extra_body={"stop_token_ids": [stop_id],
                                             "return_token_ids": True})
    got = stopped.choices[0].model_extra["token_ids"]
    assert got[-1] == stop_id and len(got) <= 5 and stopped.choices[0].finish_reason == "stop"


def test_n_choices_seeded_whole_and_streamed(live: tuple[openai.OpenAI, str]) -> None:
    client, base = live
    answer = chat(client, base, n=3, temperature=1.0, seed=11, max_tokens=12)
    texts = [c.message.content for c in answer.choices]
    assert [c.index for c in answer.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert answer.usage.completion_tokens == sum(12 for _ in texts)  # summed over choices
    again = chat(client, base, n=3, temperature=1.0, seed=11, max_tokens=12)
    assert [c.message.content for c in again.choices] == texts  # seed reproducible per choice
    streamed: dict[int, str] = {}
    for chunk in chat(client, base, n=3, temperature=1.0, seed=11, max_tokens=12, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts
    single = client.completions.create(model=base, prompt="Cats", n=2, max_tokens=6,
                                       temperature=1.0, seed=4)
    assert [c.index for c in single.choices] == [0, 1]


def test_response_format_whole_and_streamed(live: tuple[openai.OpenAI, str]) -> None:
    client, base = live
    ask = [{"role": "user", "content": "Describe Bob, aged 42, as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    answer = chat(client, base, messages=ask, max_tokens=60, response_format=fmt)
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)
    parts = [c.choices[0].delta.content or "" for c in chat(
        client, base, messages=ask, max_tokens=60, response_format=fmt, stream=True)
        if c.choices]
    assert "".join(parts) == answer.choices[0].message.content
    obj = chat(client, base, messages=ask, max_tokens=80, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, base, messages=ask, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objectx"}}})
    assert "schema" in str(info.value)


def test_unserved_fields_and_context_length(live: tuple[openai.OpenAI, str]) -> None:
    client, base = live
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, base, tools=tools)
    assert info.value.code == "unsupported_parameter" and info.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=base, prompt="x", echo=True)
    assert info.value.code == "unsupported_parameter" and info.value.param == "echo"
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, base, max_tokens=10_000_000)
    assert info.value.code == "context_length_exceeded"
    message = str(info.value)
    assert "10000000" in message and "in the prompt" in message
