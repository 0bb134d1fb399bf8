"""The real checkpoint: SmolLM2-135M-Instruct (Llama, GQA 9/3, tied embeddings, ChatML).

- fp32 greedy of one continuous batch mixing the base model with two adapters trained by
  PEFT equals transformers + PEFT (full recompute) token for token;
- the runtime's chat prompt is transformers' ChatML rendering, id for id;
- <|im_end|> ends the assistant's turn: the request stops there, with the token in its ids
  and not in its text, exactly where transformers' `generate` stops.
Kept small (2 cores): a few prompts, 16-24 tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.config import RuntimeConfig
from runtime.engine import LLMEngine
from runtime.lora.manager import build_lora_runtime
from runtime.model.tokenizer import Tokenizer
from runtime.model.weights import ModelArgs
from runtime.types import AdapterRef, EngineRequest, FinishReason, SamplingParams
from tests.support.lora_oracle import load_hf_base, load_peft_multi
from tests.support.real_model import (
    TRAIN_QUESTION,
    TRAINED_SPECS,
    chat,
    peft_generate,
    train_adapter,
)

# A 30-layer model on 2 shared cores: the session's fixtures (two adapters trained, PEFT's
# answers) take ~1 min on a quiet machine and several under load.
pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(1200)]
MAX_TOKENS = 16
QUESTIONS = (TRAIN_QUESTION, "Name one colour of the rainbow.")
# bf16 against float32 PEFT, measured on these cases: first-step logits within 0.51-0.68
# (logits span ~[-20, 30]), every greedy token equal; the bounds leave room for other CPUs.
BF16_LOGIT_ATOL = 1.5
BF16_MIN_AGREEMENT = 0.75


@pytest.fixture(scope="session")
def trained(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two adapters trained a few steps with PEFT; {name: (dir, AdapterRef)}."""
    root = tmp_path_factory.mktemp("smollm2-adapters")
    return {s.name: (root / s.name, train_adapter(smollm2_dir, root / s.name, s))
            for s in TRAINED_SPECS}


def make_engine(model_dir: Path, dtype: str | None = None) -> LLMEngine:
    config = RuntimeConfig(model_dir=model_dir, dtype=dtype, max_running=8,
                           max_batch_tokens=256, max_lora_rank=16, max_gpu_adapters=4,
                           max_host_adapters=4, max_model_len=512)
    args = ModelArgs.from_model_dir(model_dir)
    lora, cache = build_lora_runtime(config, args, torch.float32 if dtype is None else
                                     getattr(torch, dtype))
    return LLMEngine(config, args=args, lora=lora, adapters=cache)


def run_all(engine: LLMEngine, requests: list[EngineRequest]):
    for req in requests:
        engine.add_request(req)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    texts = {r.request_id: "" for r in requests}
    finals = {}
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            texts[out.request_id] += out.text_delta
            if out.finished:
                finals[out.request_id] = out
    assert not engine.has_unfinished(), "the engine stopped making progress"
    return tokens, texts, finals


def mixed_cases(tokenizer: Tokenizer, refs: dict[str, AdapterRef]):
    """(request_id, adapter name or None, prompt ids): each question, base and each adapter."""
    cases = []
    for qi, question in enumerate(QUESTIONS):
        prompt = tokenizer.apply_chat_template(chat(question))
        for name in (None, *refs):
            cases.append((f"q{qi}-{name or 'base'}", name, prompt))
    return cases


@pytest.fixture(scope="session")
def oracle(smollm2_dir: Path, trained):
    """The mixed cases and PEFT's greedy answer to each: {request_id: (tokens, logits)}."""
    refs = {name: ref for name, (_, ref) in trained.items()}
    cases = mixed_cases(Tokenizer.load(smollm2_dir), refs)
    peft_model = load_peft_multi(smollm2_dir, {n: d for n, (d, _) in trained.items()})
    expected = {rid: peft_generate(peft_model, prompt, name, MAX_TOKENS)
                for rid, name, prompt in cases}
    return refs, cases, expected


def mixed_requests(cases, refs) -> list[EngineRequest]:
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [EngineRequest(rid, prompt, sampling, refs[name] if name else None)
            for rid, name, prompt in cases]


def test_mixed_batch_greedy_equals_peft_token_for_token(smollm2_dir: Path, oracle) -> None:
    refs, cases, expected = oracle
    engine = make_engine(smollm2_dir)
    tokens, _, finals = run_all(engine, mixed_requests(cases, refs))
    for rid, _, _ in cases:
        assert finals[rid].finish_reason is FinishReason.LENGTH, (rid, finals[rid].error)
        want, _ = expected[rid]
        assert tokens[rid] == want, f"{rid}: {engine.tokenizer.decode(tokens[rid])!r} vs " \
                                    f"{engine.tokenizer.decode(want)!r}"
    # The adapters were trained to change answers: each one does on the question it learnt.
    for name in refs:
        assert tokens[f"q0-{name}"] != tokens["q0-base"], name


def test_bfloat16_weights_and_lora_float32_attention_near_peft(smollm2_dir: Path,
                                                                oracle) -> None:
    refs, cases, expected = oracle
    engine = make_engine(smollm2_dir, "bfloat16")
    assert engine.model.layers[0].qkv_proj.dtype == torch.bfloat16
    assert engine.lora.lora_a["qkv_proj"].dtype == torch.bfloat16
    assert engine.kv_cache.k.dtype == torch.float32 and engine.model.cos.dtype == torch.float32
    first_logits: dict[str, torch.Tensor] = {}
    advance, compute_logits = engine.scheduler.advance, engine.model.compute_logits
    sampled: list = []

    def record_advance(scheduled):
        sampled[:] = advance(scheduled)
        return sampled[:]

    def record_logits(hidden):
        out = compute_logits(hidden)
        for seq, row in zip(sampled, out, strict=True):
            first_logits.setdefault(seq.request_id, row.clone())
        return out

    engine.scheduler.advance = record_advance
    engine.model.compute_logits = record_logits
    tokens, _, _ = run_all(engine, mixed_requests(cases, refs))
    agree = 0
    for rid, _, _ in cases:
        want_tokens, want_logits = expected[rid]
        # bf16 weights: logits within a bf16 tolerance of PEFT's float32 ones, same first token.
        torch.testing.assert_close(first_logits[rid], want_logits[0], atol=BF16_LOGIT_ATOL,
                                   rtol=0, msg=rid)
        assert tokens[rid][0] == want_tokens[0], rid
        agree += sum(a == b for a, b in zip(tokens[rid], want_tokens, strict=True))
    # Positions equal to float32 until greedy paths may part (bench/README quotes the figure).
    assert agree / (len(cases) * MAX_TOKENS) >= BF16_MIN_AGREEMENT


def test_chat_template_is_chatml_as_transformers_renders_it(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    engine_tok = Tokenizer.load(smollm2_dir)
    hf = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    for messages in (chat("Hi"), [{"role": "system", "content": "Be brief."}, *chat("Hi"),
                                  {"role": "assistant", "content": "Hello."}, *chat("Bye")]):
        ids = engine_tok.apply_chat_template(messages)
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if not isinstance(want, list) else want
        assert ids == list(want)
        text = hf.decode(ids)
        assert text.startswith("<|im_start|>system\n")
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # A system turn of the caller's replaces the template's default one.
    assert "SmolLM" not in hf.decode(engine_tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *chat("Hi")]))


def test_im_end_ends_the_turn_where_transformers_generate_stops(smollm2_dir: Path) -> None:
    engine = make_engine(smollm2_dir)
    im_end = engine.tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    assert im_end in engine.scheduler.eos_token_ids
    questions = ("Is the sky blue? Answer yes or no.", TRAIN_QUESTION)
    prompts = [engine.tokenizer.apply_chat_template(chat(q)) for q in questions]
    sampling = SamplingParams(max_tokens=24, temperature=0.0)
    requests = [EngineRequest(f"eot-{i}", p, sampling) for i, p in enumerate(prompts)]
    tokens, texts, finals = run_all(engine, requests)
    hf = load_hf_base(smollm2_dir)
    for i, prompt in enumerate(prompts):
        rid = f"eot-{i}"
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                              eos_token_id=im_end, pad_token_id=im_end)
        want = out[0, len(prompt):].tolist()
        assert want[-1] == im_end, "the oracle must end its turn within 24 tokens"
        assert finals[rid].finish_reason is FinishReason.STOP
        assert tokens[rid] == want
        assert "<|im_end|>" not in texts[rid]
        assert texts[rid] == engine.tokenizer.decode(want[:-1])
