"""Next tokens from logits: every sampling control batched over the step's rows, logprobs.

Order, as vLLM applies it (and transformers, for the processors it has): the grammar's
allowed-token mask, `min_tokens` (EOS and stop ids masked), `logit_bias`, then the penalties
(`repetition_penalty` over prompt and generated tokens, `frequency_penalty` and
`presence_penalty` over generated tokens), then greedy argmax, or temperature, `min_p`,
`top_k`, `top_p` and a draw. Each control is a tensor op over the whole batch; a row whose
control is off gets the identity (bias 0, penalty 1, min_p 0), so one batch mixes them
freely. The per-sequence inputs (token counts, prompt tokens, biases, stop ids, scalars) live
in `SamplerState` rows on the device, written once when a sequence joins and updated
incrementally after each step, so a step reads them with one gather per tensor.

Each sampled row draws from its own sequence's generator, so a sequence's tokens do not
depend on what else is in the batch. Logprobs are those of the model's distribution (before
any control), as OpenAI reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.model.sampler_state import SamplerState
from runtime.types import SamplingParams, TokenLogprob

__all__ = ["SamplerState", "apply_controls", "filter_logits", "greedy_tokens", "has_controls",
           "make_generator", "sample"]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # fresh entropy: unseeded requests differ from each other
    else:
        gen.manual_seed(seed)
    return gen


@dataclass(frozen=True, slots=True)
class Batch:
    """One step's rows: their `SamplerState` rows and what the state holds switched on."""

    rows: torch.Tensor  # [num_seqs] int64 rows of the state
    state: SamplerState
    allowed: torch.Tensor | None = None  # [num_seqs, vocab] bool: grammar masks, None: none


def apply_controls(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The logits after grammar, min_tokens, bias and penalties (all but the sampling cuts).

    logits: [num_seqs, vocab] float32; returns a new tensor of the same shape, or `logits`
    itself when no row has any of these controls (callers never write into the result).
    """
    state, rows = batch.state, batch.rows
    if not has_controls(batch):
        return logits  # nothing to apply: no [num_seqs, vocab] copy (the all-greedy fast path)
    out = logits.clone()
    if batch.allowed is not None:
        out.masked_fill_(~batch.allowed, float("-inf"))
    if state.num_with_min_tokens:
        early = state.num_generated[rows] < state.min_tokens[rows]  # [num_seqs]
        out.masked_fill_(state.stop_mask[rows] & early[:, None], float("-inf"))
    if state.num_with_bias:
        out += state.bias[rows]
    # The penalties touch only the tokens a row has seen (hundreds of a 49k vocabulary): they
    # gather those (row, token) pairs once and scatter the new logits back.
    if state.num_with_repetition:
        r, t = state.seen[rows].nonzero(as_tuple=True)  # prompt and generated tokens
        v, p = out[r, t], state.repetition[rows][r]
        # transformers' RepetitionPenaltyLogitsProcessor: l / p if l > 0 else l * p.
        out[r, t] = torch.where(v < 0, v * p, v / p)
    if state.num_with_frequency:
        counts = state.counts[rows]  # [num_seqs, vocab] generated-token counts
        r, t = counts.nonzero(as_tuple=True)
        # OpenAI: l - c * frequency_penalty - (c > 0) * presence_penalty
        out[r, t] -= counts[r, t] * state.frequency[rows][r] + state.presence[rows][r]
    return out


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:  # [n, vocab] -> [n] int64
    """`logits.argmax(-1)` exactly (the first index of each row's maximum; NaN counts as the
    maximum, as there), ~10x faster on the CPU: torch's argmax over a row runs a scalar loop
    (1.3 ms for [32, 49152] on one core) where amax is vectorized. The first block whose
    maximum is the row's holds the row's first maximum, so: amax per block of
    _GREEDY_BLOCK, argmax over the few block maxima, argmax inside that block."""
    n, vocab = logits.shape
    if vocab % _GREEDY_BLOCK or vocab <= _GREEDY_BLOCK or logits.device.type != "cpu":
        return logits.argmax(dim=-1)
    blocks = logits.reshape(n, vocab // _GREEDY_BLOCK, _GREEDY_BLOCK)
    first = blocks.amax(dim=-1).argmax(dim=-1)  # [n]
    inner = blocks[torch.arange(n), first].argmax(dim=-1)  # [n]
    return first * _GREEDY_BLOCK + inner


_GREEDY_BLOCK = 256  # 192 blocks of SmolLM2's 49152; 128-512 all run within 20% of it


def has_controls(batch: Batch) -> bool:
    """Whether any row of the step has a grammar mask, min_tokens, a bias or a penalty."""
    state = batch.state
    return batch.allowed is not None or bool(
        state.num_with_min_tokens or state.num_with_bias or state.num_with_repetition
        or state.num_with_frequency)


def filter_logits(
    logits: torch.Tensor,  # [n, vocab] after apply_controls
    temps: torch.Tensor,  # [n] > 0
    top_k: torch.Tensor,  # [n] int64, vocab for "off"
    top_p: torch.Tensor,  # [n]
    min_p: torch.Tensor,  # [n]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted logits / temperature with cut tokens at -inf, their vocab order), both [n, vocab].

    min_p is applied on the distribution top-k leaves (the same set as on the full one: both
    keep p >= min_p * p_max), then top-p on what is left, as vLLM does.
    """
    n, vocab = logits.shape
    sorted_logits, order = (logits / temps[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)
    cut = ranks[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(cut, float("-inf")).softmax(dim=-1)
    if bool((min_p > 0).any()):
        cut |= probs < min_p[:, None] * probs[:, :1]
        probs = sorted_logits.masked_fill(cut, float("-inf")).softmax(dim=-1)
    # Drop a token when the tokens ranked above it already hold more than top_p of the mass; the
    # best token always stays.
    cut |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]
    return sorted_logits.masked_fill(cut, float("-inf")), order


@torch.inference_mode()
def sample(
    logits: torch.Tensor,  # [num_seqs, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator],
    batch: Batch | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Without `batch` (no state rows), only temperature, top_k, top_p and min_p apply."""
    num_seqs, vocab = logits.shape
    controlled = logits if batch is None else apply_controls(logits, batch)
    tokens = greedy_tokens(controlled)  # [num_seqs]; kept for greedy rows
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        tokens[rows] = _sample_rows(controlled[rows], [params[i] for i in rows],
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
    if batch is not None and batch.state.needs_history:
        batch.state.record(batch.rows, tokens)
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
    min_p = torch.tensor([p.min_p for p in params], device=device)
    sorted_logits, order = filter_logits(logits, temps, top_k, top_p, min_p)
    probs = sorted_logits.softmax(dim=-1)
    # Exponential race (Gumbel-max in disguise): argmax p / E, E ~ Exp(1), is a draw from p.
    # Each row's noise comes from its own request's generator; one argmax for the batch.
    noise = torch.stack([
        torch.empty(vocab, device=device).exponential_(generator=gen) for gen in generators
    ])  # [n, vocab]
    picks = (probs / noise).argmax(dim=-1)  # [n]
    return order.gather(1, picks[:, None]).squeeze(1)
