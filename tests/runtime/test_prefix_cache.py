"""Prefix caching in the engine (issue 14), on the built-in model with PEFT adapters.

PEFT, recomputing every prompt in full, is the oracle: an answer that starts from cached
blocks must be the same tokens, with the same logits, as PEFT's and as the engine's with the
cache off. The cache is keyed by tenant and adapter version, so another tenant or another
version of the same bytes finds nothing; blocks are evicted LRU under a small KV budget, and
a preempted sequence gives back its holds.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch

from runtime.config import RuntimeConfig
from runtime.engine import LLMEngine
from runtime.lora.manager import build_lora_runtime
from runtime.model.weights import ModelArgs
from runtime.types import AdapterRef, EngineRequest, FinishReason, SamplingParams
from tests.support.engine_runs import drain
from tests.support.lora_oracle import SPECS, load_peft_multi, make_peft_adapter, peft_greedy

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]
MAX_TOKENS = 5
BLOCK = 16
PREFIX = 3 * BLOCK + 5  # three full blocks and a few tokens of a fourth


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    """Two PEFT adapters of the built-in model, PEFT loaded with both, a shared prefix."""
    root = tmp_path_factory.mktemp("prefix-cache")
    specs = SPECS[:2]
    dirs = {s.name: root / s.name for s in specs}
    refs = {s.name: make_peft_adapter(model_dir, dirs[s.name], s) for s in specs}
    peft_model = load_peft_multi(model_dir, dirs)
    gen = torch.Generator().manual_seed(5)
    prefix = [1] + torch.randint(3, 1000, (PREFIX - 1,), generator=gen).tolist()
    return refs, peft_model, prefix


def tail(seed: int, n: int = 7) -> list[int]:
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_engine(model_dir: Path, **overrides) -> LLMEngine:
    settings = {"max_running": 8, "max_batch_tokens": 256, "max_lora_rank": 32,
                "max_gpu_adapters": 4, "max_host_adapters": 4, "block_size": BLOCK,
                **overrides}
    config = RuntimeConfig(model_dir=model_dir, **settings)
    args = ModelArgs.from_model_dir(model_dir)
    lora, cache = build_lora_runtime(config, args, torch.float32)
    return LLMEngine(config, args=args, lora=lora, adapters=cache)


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def answer(engine: LLMEngine, req: EngineRequest) -> tuple[list[int], int]:
    """(tokens, cached prompt tokens) of one request run to the end on its own."""
    engine.add_request(req)
    outs = drain(engine)[req.request_id]
    assert outs[-1].finish_reason is FinishReason.LENGTH, outs[-1].error
    return [t for o in outs for t in o.new_token_ids], outs[-1].num_cached_tokens


def request(rid: str, prompt: list[int], ref: AdapterRef | None, tenant: str = "acme",
            max_tokens: int = MAX_TOKENS) -> EngineRequest:
    return EngineRequest(rid, prompt, greedy(max_tokens), ref, tenant=tenant)


def close(engine: LLMEngine) -> None:
    engine.adapters.close()  # type: ignore[union-attr]


def test_answers_from_cached_blocks_equal_peft_and_the_uncached_engine(world, model_dir) -> None:
    refs, peft_model, prefix = world
    cached, plain = make_engine(model_dir), make_engine(model_dir, enable_prefix_caching=False)
    try:
        for name in [None, *refs]:
            ref = refs[name] if name else None
            label = name or "base"
            first = answer(cached, request(f"{label}-warm", prefix + tail(1), ref))
            assert first[1] == 0  # nothing of this tenant and adapter was cached yet
            for seed in (2, 3):
                prompt = prefix + tail(seed)
                tokens, num_cached = answer(cached, request(f"{label}-{seed}", prompt, ref))
                assert num_cached == 3 * BLOCK, label  # the full blocks of the shared prefix
                want, _ = peft_greedy(peft_model, prompt, name, MAX_TOKENS)
                assert tokens == want, label
                assert answer(plain, request(f"{label}-plain-{seed}", prompt, ref)) == (want, 0)
            # The whole prompt again: every full block hits but the one holding its last
            # token, whose logits the step must compute.
            again = prefix + tail(1)
            tokens, num_cached = answer(cached, request(f"{label}-again", again, ref))
            assert num_cached == (len(again) - 1) // BLOCK * BLOCK
            assert tokens == first[0]
            # A prompt that is exactly four cached blocks (the first prompt and its first four
            # answer tokens): the fourth is recomputed, since its last token's logits are
            # what the step must produce.
            exact = (again + tokens)[: 4 * BLOCK]
            got, num_cached = answer(cached, request(f"{label}-exact", exact, ref))
            assert num_cached == 3 * BLOCK
            assert got == peft_greedy(peft_model, exact, name, MAX_TOKENS)[0], label
            # A follow-up turn: the earlier answer's tokens are in cached blocks too.
            follow = again + tokens + tail(9)
            tokens, num_cached = answer(cached, request(f"{label}-follow", follow, ref))
            assert num_cached == 4 * BLOCK
            assert tokens == peft_greedy(peft_model, follow, name, MAX_TOKENS)[0], label
    finally:
        close(cached)
        close(plain)


def test_nothing_is_shared_across_tenants_or_adapter_versions(world, model_dir) -> None:
    refs, peft_model, prefix = world
    ref = refs[SPECS[0].name]
    # The same bytes published again as another version: equal K/V, still never shared.
    v2 = msgspec.structs.replace(ref, name=f"{ref.name}@2")
    engine = make_engine(model_dir)
    try:
        prompt = prefix + tail(4)
        answer(engine, request("warm", prompt, ref))
        assert answer(engine, request("other-tenant", prompt, ref, tenant="globex"))[1] == 0
        assert answer(engine, request("other-version", prompt, v2))[1] == 0
        assert answer(engine, request("other-adapter", prompt, refs[SPECS[1].name]))[1] == 0
        assert answer(engine, request("base-model", prompt, None))[1] == 0
        tokens, num_cached = answer(engine, request("same", prompt, ref))
        assert num_cached == 3 * BLOCK
        assert tokens == peft_greedy(peft_model, prompt, ref.name, MAX_TOKENS)[0]
        figures = engine.stats()["prefix_cache"]["tenants"]
        assert figures["globex"]["cached_tokens"] == 0
        assert figures["acme"]["cached_tokens"] == 3 * BLOCK
        assert figures["acme"]["queried_tokens"] == 5 * len(prompt)
    finally:
        close(engine)


def test_a_small_kv_budget_evicts_unheld_blocks_lru_and_answers_stay_exact(world, model_dir):
    refs, peft_model, prefix = world
    args = ModelArgs.from_model_dir(model_dir)
    per_block = 2 * args.num_layers * BLOCK * args.num_kv_heads * args.head_dim * 4
    engine = make_engine(model_dir, kv_cache_bytes=10 * per_block)  # ten blocks in all
    try:
        ref = refs[SPECS[1].name]
        prompts = [prefix + tail(10)]
        first = answer(engine, request("p0", prompts[0], ref))
        # p0 left four cached blocks and six free. Another prompt filling all ten must take
        # the six free ones first, then evict p0's four.
        other = [1] + tail(99, 150)
        answer(engine, request("other", other, ref))
        assert engine.stats()["prefix_cache"]["tenants"]["acme"]["evicted_blocks"] == 4
        bm = engine.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks  # nothing held once all finished
        tokens, num_cached = answer(engine, request("p0-again", prompts[0], ref))
        assert num_cached == 0  # evicted, recomputed
        assert tokens == first[0] == peft_greedy(peft_model, prompts[0], ref.name, MAX_TOKENS)[0]
    finally:
        close(engine)


def run_together(engine: LLMEngine, prompts: dict[str, list[int]]) -> dict[str, tuple]:
    """Add every request before the first step; (tokens, cached prompt tokens) of each."""
    for rid, prompt in prompts.items():
        engine.add_request(request(rid, prompt, None))
    outputs = drain(engine)
    return {rid: ([t for o in outs for t in o.new_token_ids], outs[-1].num_cached_tokens)
            for rid, outs in outputs.items()}


def test_two_requests_with_one_prefix_at_once(world, model_dir) -> None:
    refs, peft_model, prefix = world
    prompts = {f"r{i}": prefix + tail(20 + i) for i in range(2)}
    want = {rid: peft_greedy(peft_model, p, None, MAX_TOKENS)[0] for rid, p in prompts.items()}
    # Both prefill in the same step: neither finds the other's blocks, both fill their own,
    # and the cache keeps one block per hash.
    engine = make_engine(model_dir)
    try:
        got = run_together(engine, prompts)
        assert got == {rid: (want[rid], 0) for rid in prompts}
        bm = engine.scheduler.block_manager
        assert bm.num_cached_blocks == 3 + 2  # the shared three, then each one's own fourth
        assert all(n == 0 for n in bm.ref_counts)
        assert answer(engine, request("r2", prefix + tail(22), None))[1] == 3 * BLOCK
    finally:
        close(engine)
    # A 24-token budget prefills r0 over three steps; r1, queued behind it, is admitted in
    # the third and starts from the blocks r0 filled in the first two.
    engine = make_engine(model_dir, max_batch_tokens=24)
    try:
        got = run_together(engine, prompts)
        assert got == {"r0": (want["r0"], 0), "r1": (want["r1"], 3 * BLOCK)}
    finally:
        close(engine)


def test_preemption_while_holding_cached_blocks_releases_them(world, model_dir) -> None:
    refs, peft_model, prefix = world
    args = ModelArgs.from_model_dir(model_dir)
    per_block = 2 * args.num_layers * BLOCK * args.num_kv_heads * args.head_dim * 4
    # Twelve blocks: six requests sharing a four-block prompt and growing past it cannot all
    # stay resident, so the latest are preempted while they hold the shared blocks.
    engine = make_engine(model_dir, kv_cache_bytes=12 * per_block)
    try:
        ref = refs[SPECS[0].name]
        warm = answer(engine, request("warm", prefix + tail(30), ref))
        reqs = [request(f"q{i}", prefix + tail(31 + i), ref, max_tokens=30) for i in range(6)]
        for req in reqs:
            engine.add_request(req)
        outputs = drain(engine)
        assert engine.scheduler.num_preemptions > 0
        for req in reqs:
            outs = outputs[req.request_id]
            assert outs[-1].finish_reason is FinishReason.LENGTH
            tokens = [t for o in outs for t in o.new_token_ids]
            want = peft_greedy(peft_model, req.prompt_token_ids, ref.name, 30)[0]
            assert tokens == want, req.request_id
        bm = engine.scheduler.block_manager
        assert all(n == 0 for n in bm.ref_counts)  # every hold given back
        assert bm.num_free_blocks == bm.num_blocks
        assert warm[1] == 0
    finally:
        close(engine)


def test_n_choices_fork_from_a_cached_prefix_and_share_its_blocks(world, model_dir) -> None:
    refs, peft_model, prefix = world
    engine = make_engine(model_dir)
    try:
        ref = refs[SPECS[1].name]
        prompt = prefix + tail(40)
        answer(engine, request("warm", prefix + tail(41), ref))
        sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, n=3)
        engine.add_request(EngineRequest("n3", prompt, sampling, ref, tenant="acme"))
        outs = drain(engine)["n3"]
        want = peft_greedy(peft_model, prompt, ref.name, MAX_TOKENS)[0]
        for index in range(3):
            mine = [o for o in outs if o.index == index]
            assert [t for o in mine for t in o.new_token_ids] == want
            assert mine[-1].num_cached_tokens == 3 * BLOCK
        assert all(n == 0 for n in engine.scheduler.block_manager.ref_counts)
    finally:
        close(engine)
