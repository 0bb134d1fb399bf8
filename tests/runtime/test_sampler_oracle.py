"""The sampling controls on the real SmolLM2 checkpoint against transformers' own processors.

Greedy, token for token, every case in one continuous batch with and without a LoRA adapter
(PEFT on the HF side): RepetitionPenaltyLogitsProcessor for `repetition_penalty`,
SequenceBiasLogitsProcessor for `logit_bias`, MinNewTokensLengthLogitsProcessor for
`min_tokens`, and OpenAI's published penalty formula (a plain per-token loop, below) for
`frequency_penalty` and `presence_penalty`. top_k and min_p do not move a greedy argmax, so
their kept sets are compared with TopKLogitsWarper and MinPLogitsWarper on the model's logits.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from runtime.config import RuntimeConfig
from runtime.engine import LLMEngine
from runtime.lora.manager import build_lora_runtime
from runtime.model.sampler import filter_logits
from runtime.model.weights import ModelArgs
from runtime.types import EngineRequest, SamplingParams
from tests.support.hf_models import torch_threads
from tests.support.lora_oracle import AdapterSpec, load_peft_multi, make_peft_adapter

MODEL_DIR = Path(__file__).resolve().parents[2] / ".cache" / "smollm2-135m-instruct"
EOS = 2  # <|im_end|>
MAX_TOKENS = 24

pytestmark = [
    pytest.mark.unit, pytest.mark.slow, pytest.mark.real_model,
    pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(),
                       reason="the SmolLM2 checkpoint is not in .cache/smollm2-135m-instruct"),
]


class OpenAIPenalties:
    """OpenAI's formula, written out per token as its docs state it:
    mu[j] -> mu[j] - c[j] * frequency_penalty - float(c[j] > 0) * presence_penalty,
    c[j] = how often token j was generated so far (the prompt does not count)."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for row, ids in enumerate(input_ids.tolist()):
            for token, count in Counter(ids[self.prompt_len:]).items():
                scores[row, token] -= count * self.frequency + self.presence
        return scores


def hf_processors(params: SamplingParams, prompt_len: int) -> list:
    from transformers import (
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )

    # transformers' own order: sequence bias, repetition penalty, min new tokens.
    out: list = []
    if params.logit_bias:
        out.append(SequenceBiasLogitsProcessor({(t,): b for t, b in params.logit_bias}))
    if params.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.frequency_penalty or params.presence_penalty:
        out.append(OpenAIPenalties(prompt_len, params.frequency_penalty, params.presence_penalty))
    if params.min_tokens:
        out.append(MinNewTokensLengthLogitsProcessor(prompt_len, params.min_tokens, EOS))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sampler-oracle")
    spec = AdapterSpec("qv-r8", 8, 16.0, ("q_proj", "v_proj"), seed=5)
    ref = make_peft_adapter(MODEL_DIR, root / spec.name, spec)
    peft_model = load_peft_multi(MODEL_DIR, {spec.name: root / spec.name})
    config = RuntimeConfig(model_dir=MODEL_DIR, max_running=32, max_batch_tokens=512,
                           max_model_len=256, max_lora_rank=8, max_gpu_adapters=2,
                           max_host_adapters=2)
    lora, cache = build_lora_runtime(config, ModelArgs.from_model_dir(MODEL_DIR), torch.float32)
    engine = LLMEngine(config, lora=lora, adapters=cache)
    return engine, ref, peft_model


def chat(engine: LLMEngine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, **kw)


@torch.no_grad()
def hf_greedy(peft_model, prompt: list[int], params: SamplingParams, adapter: str | None):
    from transformers import LogitsProcessorList

    def generate():
        out = peft_model.generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
            max_new_tokens=params.max_tokens, do_sample=False, eos_token_id=EOS,
            pad_token_id=EOS, logits_processor=LogitsProcessorList(hf_processors(params,
                                                                                 len(prompt))))
        return out[0, len(prompt):].tolist()

    if adapter is None:
        with peft_model.disable_adapter():
            return generate()
    peft_model.set_adapter(adapter)
    return generate()


def test_greedy_controls_match_transformers_token_for_token_in_one_batch(world) -> None:
    engine, ref, peft_model = world
    story = chat(engine, "Write a short story about a cat, a dog and a cat.")
    short = chat(engine, "Answer with one word: is the sky blue?")
    free = hf_greedy(peft_model, story, greedy(), None)  # what the controls must move away from
    unforced = hf_greedy(peft_model, short, greedy(), None)
    assert unforced[-1] == EOS and len(unforced) < MAX_TOKENS - 4  # it stops early by itself
    cases = {
        "plain": (story, greedy()),
        "repetition": (story, greedy(repetition_penalty=1.5)),
        "repetition-under-1": (story, greedy(repetition_penalty=0.7)),
        "frequency": (story, greedy(frequency_penalty=2.0)),
        "presence": (story, greedy(presence_penalty=2.0)),
        "both-negative": (story, greedy(frequency_penalty=-0.5, presence_penalty=-1.0)),
        "bias": (story, greedy(logit_bias=((free[0], -100.0), (free[3], 8.0)))),
        "min-tokens": (short, greedy(min_tokens=len(unforced) + 4)),
        "all": (story, greedy(repetition_penalty=1.3, frequency_penalty=0.4,
                              presence_penalty=0.3, logit_bias=((free[1], -5.0),),
                              top_k=20, min_p=0.05)),
    }
    requests = []
    for name, (prompt, params) in cases.items():
        for adapter in (None, ref):
            rid = f"{name}/{'lora' if adapter else 'base'}"
            requests.append(EngineRequest(rid, prompt, params, adapter=adapter))
    with torch_threads(1):
        for req in requests:
            engine.add_request(req)
        tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
        while engine.has_unfinished():
            for out in engine.step():
                assert out.error is None, out.error
                tokens[out.request_id] += out.new_token_ids
        for req in requests:
            name = None if req.adapter is None else ref.name
            expected = hf_greedy(peft_model, req.prompt_token_ids, req.sampling, name)
            assert tokens[req.request_id] == expected, req.request_id
    # Each control changed the answer it was meant to change: the oracle is not vacuous.
    base = tokens["plain/base"]
    for name in ("repetition", "frequency", "presence", "bias", "all"):
        assert tokens[f"{name}/base"] != base, name
    assert tokens["bias/base"][0] != free[0]
    assert len(tokens["min-tokens/base"]) >= len(unforced) + 4


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_top_k_and_min_p_keep_what_transformers_warpers_keep(world, temperature: float) -> None:
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper

    engine, _ref, peft_model = world
    prompt = torch.tensor([chat(engine, "Name a colour.")])
    with torch.no_grad(), peft_model.disable_adapter():
        logits = peft_model(input_ids=prompt).logits[0, -1:].float()  # [1, vocab]
    vocab = logits.shape[-1]
    scaled = TemperatureLogitsWarper(temperature)(prompt, logits)
    for top_k, min_p in [(1, 0.0), (5, 0.0), (50, 0.0), (vocab, 0.05), (vocab, 0.2), (40, 0.1)]:
        ours, order = filter_logits(logits, torch.tensor([temperature]),
                                    torch.tensor([top_k]), torch.tensor([1.0]),
                                    torch.tensor([min_p]))
        kept = set(order[ours.isfinite()].tolist())
        theirs = TopKLogitsWarper(top_k)(prompt, scaled) if top_k < vocab else scaled
        if min_p:
            theirs = MinPLogitsWarper(min_p)(prompt, theirs)
        assert kept == set(theirs[0].isfinite().nonzero().flatten().tolist()), (top_k, min_p)
        assert len(kept) > 1 or top_k == 1
