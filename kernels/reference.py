"""The plain torch reference of the multi-LoRA ops: the oracle the fast paths are tested against.

It gathers every token's own adapter weights and computes in float64, with no sorting, no
segments and no shared code with the fast paths, so that a bug there cannot hide here. It is
slow and memory hungry (a weight copy per token); tests and benchmarks only.
"""

from __future__ import annotations

import torch


def _slice_sizes(y: torch.Tensor, lora_b: torch.Tensor, slice_sizes: list[int] | None) -> list[int]:
    # None means one slice covering all of y, as in `kernels.add_lora`.
    return [y.shape[1]] if slice_sizes is None else list(slice_sizes)


def shrink_reference(
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slices, num_slots, max_rank, in]
    scales: torch.Tensor,  # [num_slots] float32
    token_to_slot: torch.Tensor,  # [num_tokens] int, -1 = no adapter
) -> torch.Tensor:  # [num_slices, num_tokens, max_rank] float32
    """out[j, i] = scales[s] * x[i] @ lora_a[j, s].T for s = token_to_slot[i] >= 0, else 0."""
    return _shrink64(x, lora_a, scales, token_to_slot).float()


def _shrink64(
    x: torch.Tensor, lora_a: torch.Tensor, scales: torch.Tensor, token_to_slot: torch.Tensor
) -> torch.Tensor:  # [num_slices, num_tokens, max_rank] float64
    num_slices, _, max_rank, _ = lora_a.shape
    out = torch.zeros(num_slices, x.shape[0], max_rank, dtype=torch.float64, device=x.device)
    rows = (token_to_slot >= 0).nonzero().squeeze(1)
    slots = token_to_slot[rows].long()
    xs = x[rows].double()
    for j in range(num_slices):
        a = lora_a[j, slots].double()  # [rows, max_rank, in]
        out[j, rows] = torch.einsum("ti,tri->tr", xs, a) * scales[slots].double()[:, None]
    return out


def expand_reference(
    y: torch.Tensor,  # [num_tokens, sum(slice_sizes)]
    h: torch.Tensor,  # [num_slices, num_tokens, max_rank]
    lora_b: torch.Tensor,  # [num_slices, num_slots, max_out, max_rank]
    token_to_slot: torch.Tensor,  # [num_tokens] int
    slice_sizes: list[int] | None = None,
) -> torch.Tensor:  # [num_tokens, sum(slice_sizes)], a new tensor of y's dtype
    """y[i, off_j : off_j + n_j] + h[j, i] @ lora_b[j, s, :n_j].T for tokens with s >= 0."""
    sizes = _slice_sizes(y, lora_b, slice_sizes)
    out = y.double().clone()
    rows = (token_to_slot >= 0).nonzero().squeeze(1)
    slots = token_to_slot[rows].long()
    off = 0
    for j, n in enumerate(sizes):
        b = lora_b[j, slots, :n].double()  # [rows, n, max_rank]
        out[rows, off : off + n] += torch.einsum("tr,tnr->tn", h[j, rows].double(), b)
        off += n
    return out.to(y.dtype)


def add_lora_reference(
    y: torch.Tensor,  # [num_tokens, sum(slice_sizes)]
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slices, num_slots, max_rank, in]
    lora_b: torch.Tensor,  # [num_slices, num_slots, max_out, max_rank]
    scales: torch.Tensor,  # [num_slots] float32
    token_to_slot: torch.Tensor,  # [num_tokens] int
    slice_sizes: list[int] | None = None,
) -> torch.Tensor:  # a new tensor; y is left as it is
    """y[i, off_j : off_j + n_j] += scales[s] * (x[i] @ lora_a[j, s].T) @ lora_b[j, s, :n_j].T"""
    h = _shrink64(x, lora_a, scales, token_to_slot)
    return expand_reference(y, h, lora_b, token_to_slot, slice_sizes)
