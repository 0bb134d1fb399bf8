"""n choices and the batched sampling controls in the engine, on the built-in model.

n choices prefill the prompt once and fork its KV (copy-on-write blocks); choice i is seeded
from (seed, i), so each equals a lone request with that seed: sharing changes no answer.
The controls are per row: a batch mixing them gives each request its lone answer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.config import RuntimeConfig
from runtime.engine import LLMEngine, build_engine
from runtime.model.kv_cache import bytes_per_block
from runtime.model.weights import ModelArgs
from runtime.scheduling.block_manager import BlockManager
from runtime.types import EngineRequest, FinishReason, SamplingParams, choice_seed

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


def make_engine(model_dir: Path, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_bytes", 4 << 20)
    kw.setdefault("max_gpu_adapters", 0)
    return build_engine(RuntimeConfig(model_dir=model_dir, **kw))


def prompt(n: int, seed: int = 3) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 1000, (n - 1,), generator=gen).tolist()


def run(engine: LLMEngine, requests: list[EngineRequest]) -> dict[tuple[str, int], list]:
    """Every output per (request id, choice index), stepping until all are done."""
    for req in requests:
        engine.add_request(req)
    outputs: dict[tuple[str, int], list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault((out.request_id, out.index), []).append(out)
    return outputs


def tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def sampled(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, **kw)


@pytest.mark.parametrize("prompt_len", [16, 21])  # a whole number of blocks, and a partial one
def test_n_choices_equal_lone_requests_seeded_from_seed_and_index(
    model_dir: Path, prompt_len: int
) -> None:
    engine = make_engine(model_dir, block_size=16)
    ids = prompt(prompt_len)
    got = run(engine, [EngineRequest("n", ids, sampled(seed=7, n=4))])
    assert sorted(got) == [("n", i) for i in range(4)]
    for i in range(4):
        assert got[("n", i)][-1].finished and got[("n", i)][-1].num_output_tokens == 12
    choices = [tokens(got[("n", i)]) for i in range(4)]
    assert len({tuple(c) for c in choices}) == 4  # different seeds, different answers
    for i, choice in enumerate(choices):
        alone = run(make_engine(model_dir, block_size=16),
                    [EngineRequest("a", ids, sampled(seed=choice_seed(7, i)))])
        assert tokens(alone[("a", 0)]) == choice, i
    assert run(engine, [EngineRequest("again", ids, sampled(seed=7, n=4))]).keys()
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and engine.sampler_state.num_with_bias == 0
    assert len(engine.sampler_state) == 0


def test_the_prompt_is_prefilled_once_and_its_full_blocks_shared(model_dir: Path) -> None:
    engine = make_engine(model_dir, block_size=16)
    ids = prompt(40)  # two full blocks and a partial one
    engine.add_request(EngineRequest("n", ids, sampled(seed=1, n=3, max_tokens=4)))
    prefilled = []
    forward = engine.model.forward

    def counting(input_ids, *args, **kw):
        prefilled.append(input_ids.shape[0])
        return forward(input_ids, *args, **kw)

    engine.model.forward = counting
    engine.step()  # the prefill, then the fork
    running = engine.scheduler.running
    assert len(running) == 3 and prefilled == [40]
    tables = [s.block_table for s in running]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]  # the two full blocks, shared
    assert len({t[2] for t in tables}) == 3  # the partial block, copied for each
    bm = engine.scheduler.block_manager
    assert [bm.ref_counts[b] for b in tables[0]] == [3, 3, 1]
    assert bm.num_blocks - bm.num_free_blocks == 5
    # The copies hold the parent's KV for the cached positions of the partial block.
    k = engine.kv_cache.k
    src, dst = tables[0][2] * 16, tables[1][2] * 16
    assert torch.equal(k[:, src:src + 8], k[:, dst:dst + 8])
    engine.step()
    assert prefilled == [40, 3]  # then one decode token per choice
    while engine.has_unfinished():
        engine.step()
    assert bm.num_free_blocks == bm.num_blocks


def test_aborting_a_request_ends_every_choice_even_before_the_fork(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    engine.add_request(EngineRequest("n", prompt(30), sampled(n=3)))
    engine.abort("n")
    outs = engine.step()
    assert sorted(o.index for o in outs) == [0, 1, 2]
    assert all(o.finished and o.finish_reason is FinishReason.ABORT for o in outs)
    assert not engine.has_unfinished() and len(engine.sampler_state) == 0
    engine.add_request(EngineRequest("m", prompt(30), sampled(n=2)))
    engine.step()  # forked
    engine.abort("m")
    assert sorted(o.index for o in engine.step()) == [0, 1]
    bm = engine.scheduler.block_manager
    assert not engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks


def test_greedy_choices_without_blocks_for_the_fork_prefill_on_their_own(
    model_dir: Path
) -> None:
    # Four blocks of 16: the 40-token prompt holds three, each fork needs one more for its
    # copy of the partial block; the choice that finds none is queued and prefills by itself.
    per_block = bytes_per_block(ModelArgs.from_model_dir(model_dir), 16, torch.float32)
    engine = make_engine(model_dir, block_size=16, kv_cache_bytes=4 * per_block, max_running=4)
    assert engine.scheduler.block_manager.num_blocks == 4
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, n=3)
    got = run(engine, [EngineRequest("g", prompt(40), greedy)])
    answers = {tuple(tokens(got[("g", i)])) for i in range(3)}
    assert len(answers) == 1 and all(got[("g", i)][-1].finished for i in range(3))


def test_more_choices_than_max_running_all_finish(model_dir: Path) -> None:
    engine = make_engine(model_dir, max_running=2)
    got = run(engine, [EngineRequest("n", prompt(10), sampled(seed=3, n=5, max_tokens=3))])
    assert sorted(got) == [("n", i) for i in range(5)]
    assert all(len(tokens(outs)) == 3 and outs[-1].finished for outs in got.values())
    alone = run(make_engine(model_dir), [EngineRequest("a", prompt(10), sampled(
        seed=choice_seed(3, 4), max_tokens=3))])
    assert tokens(got[("n", 4)]) == tokens(alone[("a", 0)])  # queued, not forked: same answer


def test_mixed_controls_in_one_batch_give_each_request_its_lone_answer(model_dir: Path) -> None:
    cases = {
        "plain": sampled(seed=1),
        "penalties": sampled(seed=2, frequency_penalty=1.0, presence_penalty=0.5,
                             repetition_penalty=1.4),
        "bias": SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                               logit_bias=((5, 30.0),)),
        "cuts": sampled(seed=3, top_k=3, min_p=0.2, top_p=0.9),
        "greedy-rep": SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                     repetition_penalty=2.0),
    }
    ids = prompt(20)
    batch = run(make_engine(model_dir), [EngineRequest(k, ids, p) for k, p in cases.items()])
    for name, params in cases.items():
        alone = run(make_engine(model_dir), [EngineRequest(name, ids, params)])
        assert tokens(batch[(name, 0)]) == tokens(alone[(name, 0)]), name
    assert set(tokens(batch[("bias", 0)])) == {5}  # +30 wins every step
    assert len(set(tokens(batch[("greedy-rep", 0)]))) == 12  # 2.0 over a tiny model: no repeats


def test_stop_token_ids_min_tokens_and_ignore_eos(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    ids = prompt(12)
    free = tokens(run(engine, [EngineRequest("free", ids, SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True))])[("free", 0)])
    stop = free[3]
    first = free.index(stop)
    got = run(engine, [
        EngineRequest("stop", ids, SamplingParams(max_tokens=12, temperature=0.0,
                                                  stop_token_ids=(stop,))),
        EngineRequest("late", ids, SamplingParams(max_tokens=12, temperature=0.0,
                                                  stop_token_ids=(stop,), min_tokens=first + 2)),
    ])
    stopped = got[("stop", 0)]
    assert tokens(stopped) == free[: first + 1] and stopped[-1].finish_reason is FinishReason.STOP
    text = "".join(o.text_delta for o in stopped)
    assert text == engine.tokenizer.decode(free[:first])  # the stop token's text is not emitted
    late = tokens(got[("late", 0)])
    assert stop not in late[: first + 2] and len(late) > first + 1


def test_block_manager_fork_counts_references_and_frees_at_the_last_holder() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    parent: list[int] = []
    bm.allocate(parent, 10)  # blocks for tokens 0..9: two full, one partial
    child, copies = bm.fork(parent, 10)
    assert child[:2] == parent[:2] and child[2] != parent[2]
    assert copies == [(parent[2], child[2])] and bm.num_free_blocks == 2
    exact, none = bm.fork(parent, 8)  # two whole blocks: nothing to copy
    assert exact == parent[:2] and none == [] and bm.ref_counts[parent[0]] == 3
    bm.free(parent)
    assert bm.num_free_blocks == 3  # only the parent's partial block came back
    bm.free(child)
    bm.free(exact)
    assert bm.num_free_blocks == 6 and set(bm.ref_counts) == {0}
    full: list[int] = []
    bm.allocate(full, 24)
    assert not bm.can_fork(23) and bm.can_fork(24)
