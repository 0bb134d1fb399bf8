"""Next tokens from logits: greedy, temperature, top-k, top-p, per-request generators, logprobs.

Every operation is row-wise and each sampled row draws from its own request's generator, so a
request's tokens do not depend on what else is in the batch: the same seed gives the same
output alone or among 63 others. Logprobs are those of the model's distribution (before
temperature and cuts), as OpenAI reports them.
"""

from __future__ import annotations

import torch

from runtime.types import SamplingParams, TokenLogprob


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # fresh entropy: unseeded requests differ from each other
    else:
        gen.manual_seed(seed)
    return gen


@torch.inference_mode()
def sample(
    logits: torch.Tensor,  # [num_seqs, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> tuple[list[int], list[TokenLogprob | None]]:
    num_seqs, vocab = logits.shape
    tokens = logits.argmax(dim=-1)  # [num_seqs]; kept for greedy rows
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        tokens[rows] = _sample_rows(logits[rows], [params[i] for i in rows],
                                    [generators[i] for i in rows])
    chosen = tokens.tolist()
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    logprobs: list[TokenLogprob | None] = [None] * num_seqs
    if want:
        lp = torch.log_softmax(logits[want], dim=-1)  # [len(want), vocab]
        k = max(params[i].logprobs or 0 for i in want)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        picked = lp.gather(1, tokens[want].unsqueeze(1)).squeeze(1).tolist()
        top_values, top_ids = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(want):
            n = params[i].logprobs or 0
            alts = tuple(zip(top_ids[j][:n], top_values[j][:n], strict=True))
            logprobs[i] = TokenLogprob(chosen[i], picked[j], alts)
    return chosen, logprobs


def _sample_rows(
    logits: torch.Tensor,  # [n, vocab]
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> torch.Tensor:  # [n] int64
    n, vocab = logits.shape
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], device=device)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    sorted_logits, order = (logits / temps[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)
    cut = ranks[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(cut, float("-inf")).softmax(dim=-1)
    # Drop a token when the tokens ranked above it already hold more than top_p of the mass; the
    # best token always stays.
    cut |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]
    probs = sorted_logits.masked_fill(cut, float("-inf")).softmax(dim=-1)
    # Exponential race (Gumbel-max in disguise): argmax p / E, E ~ Exp(1), is a draw from p.
    # Each row's noise comes from its own request's generator; one argmax for the batch.
    noise = torch.stack([
        torch.empty(vocab, device=device).exponential_(generator=gen) for gen in generators
    ])  # [n, vocab]
    picks = (probs / noise).argmax(dim=-1)  # [n]
    return order.gather(1, picks[:, None]).squeeze(1)
