"""Sampler: draws follow the distribution, cuts are honoured, rows don't influence each other."""

from __future__ import annotations

import collections

import pytest
import torch

from runtime.model.sampler import greedy_tokens, make_generator, sample
from runtime.types import SamplingParams

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def draw(params: SamplingParams, n: int, seed: int = 0) -> collections.Counter:
    gen = make_generator(seed, "cpu")
    counts: collections.Counter = collections.Counter()
    for _ in range(n):
        tokens, _ = sample(LOGITS[None].clone(), [params], [gen])
        counts[tokens[0]] += 1
    return counts


@pytest.mark.unit
def test_temperature_one_samples_the_model_distribution() -> None:
    counts = draw(SamplingParams(temperature=1.0), 4000)
    for token, p in enumerate(PROBS.tolist()):
        assert abs(counts[token] / 4000 - p) < 0.03, counts


@pytest.mark.unit
def test_top_k_and_top_p_cut_the_tail() -> None:
    assert set(draw(SamplingParams(temperature=1.0, top_k=2), 500)) == {0, 1}
    # top_p=0.6: token 0 (0.5) and token 1 (mass above it 0.5 < 0.6) stay; token 2 goes.
    counts = draw(SamplingParams(temperature=1.0, top_p=0.6), 1000)
    assert set(counts) == {0, 1}
    assert abs(counts[0] / 1000 - 0.5 / 0.8) < 0.05
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.4), 200)) == {0}


@pytest.mark.unit
def test_low_temperature_sharpens() -> None:
    assert draw(SamplingParams(temperature=0.05), 300)[0] == 300


@pytest.mark.unit
def test_rows_are_independent_and_greedy_rows_ignore_generators() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    greedy = SamplingParams(temperature=0.0, logprobs=2)
    alone, _ = sample(logits[1:2].clone(), [seeded], [make_generator(5, "cpu")])
    mixed, logprobs = sample(
        logits.clone(),
        [SamplingParams(temperature=1.0), seeded, greedy],
        [make_generator(None, "cpu"), make_generator(5, "cpu"), make_generator(None, "cpu")],
    )
    assert mixed[1] == alone[0]
    assert mixed[2] == int(logits[2].argmax())
    assert logprobs[0] is None and logprobs[1] is None
    lp = logprobs[2]
    ref = torch.log_softmax(logits[2], dim=-1)
    assert lp.token_id == mixed[2] and abs(lp.logprob - float(ref.max())) < 1e-6
    assert [t for t, _ in lp.top] == ref.topk(2).indices.tolist()


@pytest.mark.unit
def test_a_temperature_below_1e_5_is_greedy_in_the_runtime_too() -> None:
    # Called directly (not through the gateway, which sends such a request as 0): dividing the
    # logits by 1e-39 overflows them, and the softmax of inf is NaN, not the argmax.
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    for temperature in (1e-39, 9.9e-6):
        tokens, _ = sample(logits.clone(), [SamplingParams(temperature=temperature)],
                           [make_generator(0, "cpu")])
        assert tokens == [1]


@pytest.mark.parametrize("vocab", [49152, 1024, 1000, 256])
def test_greedy_tokens_is_argmax_with_ties_and_non_finite_rows(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    for trial in range(40):
        # Small integers: many ties, so "the first maximum" is what is tested.
        logits = torch.randint(0, 4, (9, vocab), generator=gen).float()
        if trial % 2:
            logits = torch.randn(9, vocab, generator=gen)
        logits[2] = float("-inf")
        logits[4, [vocab // 3, vocab - 1]] = float("inf")
        logits[6, (trial * 37) % vocab] = float("nan")
        logits[7, -1] = logits[7].max() + 1  # the maximum in the last block
        assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))
