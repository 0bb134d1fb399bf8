"""The wire format alone: body decoding into EngineRequest, events out and back in."""

from __future__ import annotations

import json

import pytest

from runtime.protocol import (
    ErrorEvent,
    FinishEvent,
    ProtocolError,
    RequestLimits,
    StartEvent,
    TokenEvent,
    Usage,
    build_request,
    decode_event,
    decode_generate,
    encode_event,
    output_events,
)
from runtime.types import FinishReason, RequestOutput, TokenLogprob

pytestmark = pytest.mark.unit
LIMITS = RequestLimits(max_model_len=32, vocab_size=100, max_lora_rank=8)


def decode(**body) -> object:
    return decode_generate(json.dumps({"request_id": "r", **body}).encode())


def test_full_body_becomes_an_engine_request() -> None:
    body = decode(
        tenant="acme", prompt_token_ids=[1, 2, 3],
        sampling={"max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 7,
                  "stop": ["\n\n", "END"], "logprobs": 3, "ignore_eos": True},
        adapter={"key": "f" * 64, "uri": "s3://b/p/sha256/ff/" + "f" * 64, "rank": 4,
                 "alpha": 8, "target_modules": ["q_proj", "down_proj"], "name": "acme/x@2"},
    )  # fmt: skip
    req = build_request(body, body.prompt_token_ids, LIMITS)
    assert (req.request_id, req.tenant, req.prompt_token_ids) == ("r", "acme", [1, 2, 3])
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (5, 0.7, 0.9, 40, 7)
    assert (s.stop, s.logprobs, s.ignore_eos) == (("\n\n", "END"), 3, True)
    a = req.adapter
    assert (a.rank, a.alpha, a.target_modules, a.name) == (4, 8.0, ("q_proj", "down_proj"),
                                                           "acme/x@2")
    assert a.scale == 2.0


def test_defaults_follow_the_contract() -> None:
    body = decode(prompt="hi")
    req = build_request(body, [1, 9], LIMITS)
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop, s.logprobs) == (
        16, 1.0, 1.0, -1, None, (), None)
    assert req.adapter is None and req.tenant == ""


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt_token_ids": [1], "sampling": {"seed": -1}}, "seed"),
        ({"prompt_token_ids": [1], "sampling": {"max_tokens": 33}}, "max_tokens"),
        ({"prompt_token_ids": [1], "sampling": {"temperature": True}}, "temperature"),
        ({"prompt_token_ids": [1], "adapter": {"key": "f" * 64, "uri": "file:///a", "rank": 4,
                                               "alpha": 0, "target_modules": ["q_proj"]}},
         "alpha"),
        ({"prompt_token_ids": [1], "adapter": {"key": "F" * 64, "uri": "file:///a", "rank": 4,
                                               "alpha": 1, "target_modules": ["q_proj"]}},
         "adapter.key"),
        ({"prompt_token_ids": [1], "adapter": {"key": "f" * 64, "uri": "file:///a", "rank": 4,
                                               "alpha": 1, "target_modules": []}},
         "target_modules"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt, messages"),
    ],
)
def test_refusals_name_the_field(body: dict, needle: str) -> None:
    with pytest.raises(ProtocolError) as excinfo:
        parsed = decode(**body)
        build_request(parsed, parsed.prompt_token_ids or [1], LIMITS)
    assert needle in excinfo.value.message


def test_prompt_must_leave_room_for_one_token() -> None:
    # max_tokens 1: a prompt plus max_tokens past the context is refused on its own (below).
    body = decode(prompt_token_ids=[1] * 31, sampling={"max_tokens": 1})
    assert len(build_request(body, body.prompt_token_ids, LIMITS).prompt_token_ids) == 31
    body = decode(prompt_token_ids=[1] * 32)
    with pytest.raises(ProtocolError) as excinfo:
        build_request(body, body.prompt_token_ids, LIMITS)
    assert excinfo.value.code == "prompt_too_long"


def test_prompt_plus_max_tokens_past_the_context_is_refused_with_both_numbers() -> None:
    body = decode(prompt_token_ids=[1] * 20, sampling={"max_tokens": 12})
    assert build_request(body, body.prompt_token_ids, LIMITS).sampling.max_tokens == 12
    body = decode(prompt_token_ids=[1] * 20, sampling={"max_tokens": 13})
    with pytest.raises(ProtocolError) as excinfo:
        build_request(body, body.prompt_token_ids, LIMITS)
    assert excinfo.value.code == "context_length_exceeded"
    assert "32" in excinfo.value.message and "33" in excinfo.value.message
    assert "20 in the prompt" in excinfo.value.message


@pytest.mark.parametrize("sampling,needle", [
    ({"n": 17}, "n must be"), ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {"100": 1.0}}, "token ids between 0 and 99"),
    ({"logit_bias": {"5": 101.0}}, "logit_bias"), ({"stop_token_ids": [100]}, "stop_token_ids"),
    ({"min_tokens": 17}, "min_tokens"), ({"response_format": "json_schema"}, "json_schema"),
])
def test_sampling_controls_out_of_range_are_refused(sampling: dict, needle: str) -> None:
    body = decode(prompt_token_ids=[1, 2], sampling=sampling)
    with pytest.raises(ProtocolError) as excinfo:
        build_request(body, body.prompt_token_ids, LIMITS)
    assert needle in excinfo.value.message


def test_sampling_controls_reach_the_engine_request() -> None:
    body = decode(prompt_token_ids=[1, 2], sampling={
        "n": 3, "frequency_penalty": 0.5, "presence_penalty": -0.5, "repetition_penalty": 1.3,
        "min_p": 0.1, "top_k": 5, "logit_bias": {"7": -100, "3": 2.5}, "min_tokens": 2,
        "stop_token_ids": [9], "ignore_eos": True, "max_tokens": 4})
    params = build_request(body, body.prompt_token_ids, LIMITS).sampling
    assert (params.n, params.frequency_penalty, params.presence_penalty) == (3, 0.5, -0.5)
    assert (params.repetition_penalty, params.min_p, params.top_k) == (1.3, 0.1, 5)
    assert params.logit_bias == ((3, 2.5), (7, -100.0)) and params.stop_token_ids == (9,)
    assert params.min_tokens == 2 and params.ignore_eos and params.uses_penalties


def test_events_round_trip_with_their_type_tag() -> None:
    events = [
        StartEvent(prompt_tokens=4),
        TokenEvent(token_ids=[7], text="é", logprobs=None),
        FinishEvent(finish_reason="stop", usage=Usage(prompt_tokens=4, completion_tokens=1)),
        ErrorEvent(code="internal_error", message="x"),
    ]
    lines = [encode_event(e) for e in events]
    assert [json.loads(line)["type"] for line in lines] == ["start", "token", "finish", "error"]
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    back = [decode_event(line) for line in lines]
    assert back == events


def test_output_events_for_tokens_finish_and_errors() -> None:
    lp = TokenLogprob(5, -0.1, ((5, -0.1), (6, -2.5)))
    out = RequestOutput("r", [5], [lp], "ab", finished=True, finish_reason=FinishReason.STOP)
    token, finish = output_events(out, lambda t: f"t{t}", num_prompt_tokens=3,
                                  num_completion_tokens=4)
    assert token.token_ids == [5] and token.text == "ab"
    assert [(t.token_id, t.token) for t in token.logprobs[0].top] == [(5, "t5"), (6, "t6")]
    # The engine reported no counts here: the server's own counts fill the usage.
    assert (finish.finish_reason, finish.usage.prompt_tokens, finish.usage.completion_tokens) == (
        "stop", 3, 4)
    failed = RequestOutput("r", [], finished=True, finish_reason=FinishReason.ERROR,
                           error="adapter a@1 failed to load: sha256 mismatch")
    assert output_events(failed, None, 3, 0) == [
        ErrorEvent("adapter_load_failed", "adapter a@1 failed to load: sha256 mismatch")]
    crashed = RequestOutput("r", [], finished=True, finish_reason=FinishReason.ERROR,
                            error="internal error in the engine step")
    assert output_events(crashed, None, 3, 0)[0].code == "internal_error"
    aborted = RequestOutput("r", [], finished=True, finish_reason=FinishReason.ABORT,
                            num_prompt_tokens=3, num_output_tokens=2)
    (only,) = output_events(aborted, None, 3, 2)
    assert only.finish_reason == "abort" and only.usage.completion_tokens == 2
