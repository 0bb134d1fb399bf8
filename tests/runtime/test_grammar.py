"""response_format json_object / json_schema: invalid schemas refused before queueing, and on
SmolLM2 every answer parses and matches its schema unless it ended by length, greedy or
sampled, with n choices, next to unconstrained requests in the same batch, and with the model
pushed hard toward blanks (whitespace is bounded)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from runtime.config import RuntimeConfig
from runtime.engine import LLMEngine, build_engine
from runtime.protocol import ProtocolError, RequestLimits
from runtime.structured import MAX_BLANKS
from runtime.types import EngineRequest, FinishReason, SamplingParams
from tests.support.hf_models import torch_threads

MODEL_DIR = Path(__file__).resolve().parents[2] / ".cache" / "smollm2-135m-instruct"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                  "maxItems": 3}}}
pytestmark = pytest.mark.unit


def schema_params(schema: object, **kw) -> SamplingParams:
    raw = schema if isinstance(schema, str) else json.dumps(schema)
    return SamplingParams(response_format="json_schema", json_schema=raw, **kw)


@pytest.mark.parametrize("schema", ['{"type": "objectx"}', "{not json",
                                    '{"type": "string", "minLength": "three"}',
                                    '{"$ref": "#/definitions/missing"}'])
def test_an_invalid_schema_is_refused_before_it_is_queued(schema: str) -> None:
    limits = RequestLimits(max_model_len=64, vocab_size=100, max_lora_rank=8)
    with pytest.raises(ProtocolError) as excinfo:
        limits.check(EngineRequest("r", [1, 2], schema_params(schema, max_tokens=4)))
    assert excinfo.value.code == "invalid_request" and "schema" in excinfo.value.message
    limits.check(EngineRequest("ok", [1, 2], schema_params(PERSON, max_tokens=4)))
    limits.check(EngineRequest("obj", [1, 2], SamplingParams(max_tokens=4,
                                                              response_format="json_object")))


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip("the SmolLM2 checkpoint is not in .cache/smollm2-135m-instruct")
    return build_engine(RuntimeConfig(model_dir=MODEL_DIR, max_gpu_adapters=0,
                                      max_model_len=512, max_running=16))


def run(engine: LLMEngine, requests: list[EngineRequest]) -> dict[tuple[str, int], tuple]:
    """{(id, index): (text, finish reason, error)}, the text joined from the stream deltas."""
    texts: dict[tuple[str, int], str] = {}
    ends = {}
    with torch_threads(1):
        for req in requests:
            engine.add_request(req)
        while engine.has_unfinished():
            for out in engine.step():
                key = (out.request_id, out.index)
                texts[key] = texts.get(key, "") + out.text_delta
                if out.finished:
                    ends[key] = (texts[key], out.finish_reason, out.error)
    return ends


def prompt(engine: LLMEngine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


@pytest.mark.slow
@pytest.mark.real_model
def test_answers_parse_and_match_the_schema_next_to_free_requests(engine: LLMEngine) -> None:
    ask = prompt(engine, "Describe a person called Ann, aged 31, as JSON.")
    free = SamplingParams(max_tokens=24, temperature=0.0)
    requests = [
        EngineRequest("greedy", ask, schema_params(PERSON, max_tokens=60, temperature=0.0)),
        EngineRequest("sampled", ask, schema_params(PERSON, max_tokens=60, temperature=1.0,
                                                    seed=5, n=4)),
        EngineRequest("object", ask, SamplingParams(max_tokens=120, temperature=0.8, seed=2,
                                                    response_format="json_object")),
        EngineRequest("free", ask, free),
    ]
    ends = run(engine, requests)
    assert len(ends) == 7 and all(error is None for _, _, error in ends.values())
    for key in [("greedy", 0), *(("sampled", i) for i in range(4))]:
        text, reason, _ = ends[key]
        assert reason is FinishReason.STOP, (key, text)
        jsonschema.validate(json.loads(text), PERSON)
    text, reason, _ = ends[("object", 0)]
    if reason is FinishReason.STOP:
        assert isinstance(json.loads(text), dict)
    else:
        assert reason is FinishReason.LENGTH and text.startswith("{")
    # The unconstrained request in the same batch got exactly its lone answer.
    assert ends[("free", 0)] == run(engine, [EngineRequest("free", ask, free)])[("free", 0)]
    assert len({ends[("sampled", i)][0] for i in range(4)}) > 1  # per-choice seeds


@pytest.mark.slow
@pytest.mark.real_model
def test_whitespace_is_bounded_even_when_the_model_wants_only_blanks(engine: LLMEngine) -> None:
    texts = {t: engine.tokenizer.token_text(t) for t in range(engine.tokenizer.vocab_size)}
    blanks = [t for t, text in texts.items() if text and not text.strip(" \n")]
    bias = tuple((t, 100.0) for t in blanks[:300])
    ask = prompt(engine, "Any JSON object.")
    ends = run(engine, [EngineRequest("ws", ask, SamplingParams(
        max_tokens=80, temperature=0.0, logit_bias=bias, response_format="json_object"))])
    text, _reason, error = ends[("ws", 0)]
    assert error is None and text.startswith("{")
    runs = re.findall(r"[ \n]+", text)
    assert runs and max(len(r) for r in runs) <= MAX_BLANKS  # blanks forced, yet bounded
    assert text.strip() != "{"  # it still made progress past the blanks


@pytest.mark.slow
@pytest.mark.real_model
def test_the_next_masks_are_filled_in_the_background(engine: LLMEngine) -> None:
    ask = prompt(engine, "JSON please.")
    engine.add_request(EngineRequest("bg", ask, schema_params(PERSON, max_tokens=8)))
    with torch_threads(1):
        engine.step()  # prefill + first token: the mask for the second is then being filled
        assert engine.grammars._pending is not None
        while engine.has_unfinished():
            engine.step()
    assert len(engine.grammars) == 0
