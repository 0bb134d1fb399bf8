"""LLMEngine end to end on the built-in model: batching changes nothing, sampling, stops, aborts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.config import RuntimeConfig
from runtime.engine import LLMEngine, QueueFull, build_engine
from runtime.types import AdapterRef, EngineRequest, FinishReason, SamplingParams
from tests.support.hf_models import hf_greedy, hf_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT_LENGTHS = (5, 17, 40, 70, 3, 33)
MAX_TOKENS = 24


def make_engine(model_dir: Path, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_bytes", 4 << 20)
    kw.setdefault("max_gpu_adapters", 0)  # base engine; one test below keeps the LoRA layers
    return build_engine(RuntimeConfig(model_dir=model_dir, **kw))


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [[1] + torch.randint(3, 1000, (n - 1,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def drain(engine: LLMEngine, outputs: dict[str, list] | None = None) -> dict[str, list]:
    outputs = {} if outputs is None else outputs
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def tokens_of(outs: list) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def run_alone(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list:
    engine.add_request(EngineRequest("alone", prompt, params))
    return drain(engine)["alone"]


@pytest.mark.unit
def test_continuous_batching_chunked_prefill_and_preemption_change_nothing(model_dir: Path):
    # With the default config the LoRA layers are attached: base requests must not notice.
    alone_engine = make_engine(model_dir, max_gpu_adapters=8)
    alone = [tokens_of(run_alone(alone_engine, p, greedy())) for p in prompts()]
    hf = hf_model(model_dir)
    assert alone == [hf_greedy(hf, p, MAX_TOKENS) for p in prompts()]

    # A 24-token budget chunks every long prompt; 14 blocks of 16 tokens cannot hold all six
    # sequences at full length, so some are preempted and recomputed.
    busy = make_engine(model_dir, max_batch_tokens=24, kv_cache_bytes=None, max_running=6)
    busy = make_engine(model_dir, max_batch_tokens=24, max_running=6,
                       kv_cache_bytes=14 * _block_bytes(busy))
    outputs: dict[str, list] = {}
    for i, prompt in enumerate(prompts()):  # admitted at different steps
        busy.add_request(EngineRequest(f"r{i}", prompt, greedy()))
        for out in busy.step():
            outputs.setdefault(out.request_id, []).append(out)
    drain(busy, outputs)
    assert busy.scheduler.num_preemptions > 0
    assert [tokens_of(outputs[f"r{i}"]) for i in range(len(PROMPT_LENGTHS))] == alone
    assert all(outputs[f"r{i}"][-1].finish_reason is FinishReason.LENGTH for i in range(6))
    assert busy.stats()["kv_blocks_free"] == busy.stats()["kv_blocks_total"]


def _block_bytes(engine: LLMEngine) -> int:
    from runtime.model.kv_cache import bytes_per_block

    return bytes_per_block(engine.model.args, engine.config.block_size, engine.dtype)


@pytest.mark.unit
def test_seeded_sampling_is_independent_of_the_batch(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=1234,
                            ignore_eos=True)
    p = prompts()
    alone = tokens_of(run_alone(engine, p[1], params))
    for i, prompt in enumerate(p):
        other = SamplingParams(max_tokens=20, temperature=1.0, seed=i, ignore_eos=True)
        engine.add_request(EngineRequest(f"o{i}", prompt, other))
    engine.step()
    engine.add_request(EngineRequest("seeded", p[1], params))
    outputs = drain(engine)
    assert tokens_of(outputs["seeded"]) == alone
    other_seed = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=99,
                                ignore_eos=True)
    assert tokens_of(run_alone(engine, p[1], other_seed)) != alone


@pytest.mark.unit
def test_top_k_one_is_greedy(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    p = prompts()[2]
    sampled = SamplingParams(max_tokens=12, temperature=1.5, top_k=1, ignore_eos=True)
    assert tokens_of(run_alone(engine, p, sampled)) == tokens_of(
        run_alone(engine, p, greedy(12)))


@pytest.mark.unit
def test_text_deltas_and_stop_strings(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    p = prompts()[3]
    outs = run_alone(engine, p, greedy(30))
    text = "".join(o.text_delta for o in outs)
    assert text == engine.tokenizer.decode(tokens_of(outs)) and len(text) > 12
    stop = text[8:12]
    cut = text.find(stop)
    stopped = run_alone(engine, p, greedy(30, stop=("\x00never", stop)))
    assert "".join(o.text_delta for o in stopped) == text[:cut]
    assert stopped[-1].finished and stopped[-1].finish_reason is FinishReason.STOP
    assert len(tokens_of(stopped)) < 30


@pytest.mark.unit
def test_logprobs_match_transformers(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    p = prompts()[1]
    outs = run_alone(engine, p, greedy(6, logprobs=3))
    hf = hf_model(model_dir)
    ids = list(p)
    for out in outs:
        (lp,) = out.new_logprobs
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1], dim=-1)
        top = ref.topk(3)
        assert lp.token_id == out.new_token_ids[0] == int(top.indices[0])
        assert abs(lp.logprob - float(ref[lp.token_id])) < 1e-4
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert all(abs(v - float(ref[t])) < 1e-4 for t, v in lp.top)
        ids.append(lp.token_id)
    assert run_alone(engine, p, greedy(2))[0].new_logprobs is None


@pytest.mark.unit
def test_abort_frees_blocks_and_reports_abort(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    p = prompts()
    engine.add_request(EngineRequest("a", p[3], greedy(50)))
    engine.add_request(EngineRequest("b", p[2], greedy(5)))
    engine.step()
    engine.step()
    engine.abort("a")
    outputs = drain(engine)
    assert outputs["a"][-1].finish_reason is FinishReason.ABORT
    assert outputs["b"][-1].finish_reason is FinishReason.LENGTH
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_running"] == 0


@pytest.mark.unit
def test_requests_out_of_range_are_refused(model_dir: Path) -> None:
    engine = make_engine(model_dir, max_model_len=64, max_waiting=2, max_gpu_adapters=0)
    with pytest.raises(ValueError, match="context length"):
        engine.add_request(EngineRequest("long", [1] * 64, greedy(4)))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(EngineRequest("empty", [], greedy(4)))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request(EngineRequest("vocab", [1, 10**6], greedy(4)))
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request(EngineRequest("t", [1, 2], SamplingParams(temperature=5.0)))
    adapter = AdapterRef("a" * 64, "file:///nowhere", 8, 16.0, ("q_proj",))
    with pytest.raises(ValueError, match="adapters"):  # never served by the base model
        engine.add_request(EngineRequest("lora", [1, 5], greedy(4), adapter=adapter))
    engine.add_request(EngineRequest("w1", [1, 5], greedy(4)))
    engine.add_request(EngineRequest("w2", [1, 5], greedy(4)))
    with pytest.raises(QueueFull):
        engine.add_request(EngineRequest("w3", [1, 5], greedy(4)))
    outputs = drain(engine)
    assert tokens_of(outputs["w1"]) == tokens_of(outputs["w2"])


@pytest.mark.unit
def test_generation_stops_at_the_context_length(model_dir: Path) -> None:
    # A prompt plus max_tokens past the context is refused (never silently capped); one
    # that fills it exactly runs to the end of the context.
    from runtime.protocol import ProtocolError

    engine = make_engine(model_dir, max_model_len=40)
    with pytest.raises(ProtocolError) as refused:
        engine.add_request(EngineRequest("long", prompts()[2][:30], greedy(40)))
    assert refused.value.code == "context_length_exceeded"
    assert "40 tokens" in refused.value.message and "70 were requested" in refused.value.message
    outs = run_alone(engine, prompts()[2][:30], greedy(10))
    assert len(tokens_of(outs)) == 10 and outs[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.unit
def test_eos_from_the_model_config_stops_generation(model_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    prompt = prompts()[2]
    free = tokens_of(run_alone(make_engine(model_dir), prompt, greedy(12)))
    eos = free[4]
    first = free.index(eos)
    copy = tmp_path / "eos-model"
    shutil.copytree(model_dir, copy)
    cfg = json.loads((copy / "config.json").read_text()) | {"eos_token_id": [2, eos]}
    (copy / "config.json").write_text(json.dumps(cfg))
    engine = make_engine(copy)
    outs = run_alone(engine, prompt, SamplingParams(max_tokens=12, temperature=0.0))
    assert tokens_of(outs) == free[: first + 1]  # the EOS token is reported, then it stops
    assert outs[-1].finish_reason is FinishReason.STOP
    ignored = run_alone(engine, prompt, greedy(12))  # ignore_eos=True
    assert tokens_of(ignored) == free
