"""The vectorized torch path of the multi-LoRA ops, for CPU tensors outside the interpreter.

Tokens are gathered once into slot order (`meta.sorted_token_ids`), so each active slot's
tokens are one contiguous block; every block then takes one matmul per slice against its
adapter's weights, used in place (views, no per-token weight copies as in gather-then-bmm).
The Python loop runs over active slots and slices, never over tokens: its cost grows with the
number of distinct adapters in the step, while the arithmetic is the same as one big matmul.
Accumulation is float32 whatever the input dtype.
"""

from __future__ import annotations

import torch

from kernels.metadata import LoraMeta


def _sorted_rows(meta: LoraMeta) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
    """Active segments and the token indices of all tokens that have an adapter, slot order."""
    segments = meta.host_segments()
    if not segments:
        return segments, meta.sorted_token_ids[:0].long()
    _, last_start, last_count = segments[-1]
    return segments, meta.sorted_token_ids[: last_start + last_count].long()


def _shrink_sorted(
    xs: torch.Tensor,  # [num_lora_tokens, in], slot order
    lora_a: torch.Tensor,  # [num_slices, num_slots, max_rank, in]
    scales: torch.Tensor,  # [num_slots] float32
    segments: list[tuple[int, int, int]],
) -> torch.Tensor:  # [num_slices, num_lora_tokens, max_rank] float32
    num_slices, _, max_rank, _ = lora_a.shape
    h = torch.empty(num_slices, xs.shape[0], max_rank, dtype=torch.float32, device=xs.device)
    scale_list = scales.tolist()
    for slot, start, count in segments:
        block = xs[start : start + count]
        for j in range(num_slices):
            out = h[j, start : start + count]
            torch.matmul(block, lora_a[j, slot].to(torch.float32).t(), out=out)
            out.mul_(scale_list[slot])
    return h


def _expand_sorted(
    h: torch.Tensor,  # [num_slices, num_lora_tokens, max_rank] float32, slot order
    lora_b: torch.Tensor,  # [num_slices, num_slots, max_out, max_rank]
    slice_sizes: list[int],
    segments: list[tuple[int, int, int]],
) -> torch.Tensor:  # [num_lora_tokens, sum(slice_sizes)] float32
    delta = torch.empty(h.shape[1], sum(slice_sizes), dtype=torch.float32, device=h.device)
    for slot, start, count in segments:
        off = 0
        for j, n in enumerate(slice_sizes):
            b = lora_b[j, slot, :n].to(torch.float32)  # [n, max_rank]
            delta[start : start + count, off : off + n] = h[j, start : start + count] @ b.t()
            off += n
    return delta


def _add_rows(y: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> None:
    """y[rows] += delta, in place, rounding once to y's dtype (rows are distinct)."""
    if y.dtype == torch.float32:
        y.index_add_(0, rows, delta)
    else:
        y.index_copy_(0, rows, (y.index_select(0, rows).to(torch.float32) + delta).to(y.dtype))


def add_lora(
    y: torch.Tensor,  # [num_tokens, sum(slice_sizes)]
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slices, num_slots, max_rank, in]
    lora_b: torch.Tensor,  # [num_slices, num_slots, max_out, max_rank]
    scales: torch.Tensor,  # [num_slots] float32
    meta: LoraMeta,
    slice_sizes: list[int],
) -> None:
    segments, rows = _sorted_rows(meta)
    if not segments:
        return
    xs = x.index_select(0, rows).to(torch.float32)
    h = _shrink_sorted(xs, lora_a, scales, segments)
    _add_rows(y, rows, _expand_sorted(h, lora_b, slice_sizes, segments))


def lora_shrink(
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slices, num_slots, max_rank, in]
    scales: torch.Tensor,  # [num_slots] float32
    meta: LoraMeta,
    out: torch.Tensor,  # [num_slices, num_tokens, max_rank] float32, zeroed by the caller
) -> None:
    segments, rows = _sorted_rows(meta)
    if not segments:
        return
    xs = x.index_select(0, rows).to(torch.float32)
    out.index_copy_(1, rows, _shrink_sorted(xs, lora_a, scales, segments))


def lora_expand(
    y: torch.Tensor,  # [num_tokens, sum(slice_sizes)]
    h: torch.Tensor,  # [num_slices, num_tokens, max_rank]
    lora_b: torch.Tensor,  # [num_slices, num_slots, max_out, max_rank]
    meta: LoraMeta,
    slice_sizes: list[int],
) -> None:
    segments, rows = _sorted_rows(meta)
    if not segments:
        return
    hs = h.index_select(1, rows).to(torch.float32)
    _add_rows(y, rows, _expand_sorted(hs, lora_b, slice_sizes, segments))
