"""Builders for the kernel tests: random multi-LoRA batches and a naive per-token oracle."""

from __future__ import annotations

from dataclasses import dataclass

import torch

RANKS = (4, 8, 16, 64)
# Per-dtype tolerances: the oracle is exact (float64) on the same low-precision inputs, so the
# error is float32 accumulation plus one rounding of y to its dtype.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}


@dataclass
class Case:
    y: torch.Tensor  # [num_tokens, sum(slice_sizes)]
    x: torch.Tensor  # [num_tokens, in]
    lora_a: torch.Tensor  # [num_slices, num_slots, max_rank, in]
    lora_b: torch.Tensor  # [num_slices, num_slots, max_out, max_rank]
    scales: torch.Tensor  # [num_slots] float32
    token_to_slot: torch.Tensor  # [num_tokens] int32
    slice_sizes: list[int]
    ranks: list[int]


def make_case(
    num_tokens: int,
    in_features: int,
    slice_sizes: list[int],
    num_slots: int,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    ranks: tuple[int, ...] = RANKS,
    no_adapter_fraction: float = 0.25,
    token_to_slot: torch.Tensor | None = None,
) -> Case:
    """A batch where each slot holds an adapter of its own rank, zero-padded to max rank."""
    g = torch.Generator().manual_seed(seed)
    num_slices, max_out = len(slice_sizes), max(slice_sizes)
    slot_ranks = [ranks[i % len(ranks)] for i in range(num_slots)]
    max_rank = max(slot_ranks)
    lora_a = torch.zeros(num_slices, num_slots, max_rank, in_features)
    lora_b = torch.zeros(num_slices, num_slots, max_out, max_rank)
    for s, r in enumerate(slot_ranks):
        # Scaled so that every output stays O(1) whatever the rank and width.
        lora_a[:, s, :r] = torch.randn(num_slices, r, in_features, generator=g) / in_features**0.5
        lora_b[:, s, :, :r] = torch.randn(num_slices, max_out, r, generator=g) / r**0.5
    scales = torch.tensor([16.0 / r for r in slot_ranks]) * torch.rand(num_slots, generator=g)
    if token_to_slot is None:
        token_to_slot = torch.randint(0, num_slots, (num_tokens,), generator=g)
        off = torch.rand(num_tokens, generator=g) < no_adapter_fraction
        token_to_slot = torch.where(off, -1, token_to_slot)
    return Case(
        y=torch.randn(num_tokens, sum(slice_sizes), generator=g).to(dtype),
        x=torch.randn(num_tokens, in_features, generator=g).to(dtype),
        lora_a=lora_a.to(dtype),
        lora_b=lora_b.to(dtype),
        scales=scales,
        token_to_slot=token_to_slot.to(torch.int32),
        slice_sizes=list(slice_sizes),
        ranks=slot_ranks,
    )


def naive_loop(case: Case) -> torch.Tensor:  # [num_tokens, sum(slice_sizes)] float64
    """The semantics of add_lora written token by token, in float64, using each true rank."""
    out = case.y.double().clone()
    for i, s in enumerate(case.token_to_slot.tolist()):
        if s < 0:
            continue
        r, off = case.ranks[s], 0
        for j, n in enumerate(case.slice_sizes):
            a = case.lora_a[j, s, :r].double()  # [r, in]
            b = case.lora_b[j, s, :n, :r].double()  # [n, r]
            out[i, off : off + n] += float(case.scales[s]) * (case.x[i].double() @ a.T) @ b.T
            off += n
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype])


def dense_inputs(
    case: Case, slots: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_pack, b_pack, mask) of `case`'s one layer, as the LoRA manager packs them: over
    `slots` (default: the slots its tokens use) at their largest rank, each slot's mask
    columns past its own rank zero."""
    import kernels

    t2s = case.token_to_slot.tolist()
    slots = slots or sorted({s for s in t2s if s >= 0})
    rank = max(case.ranks[s] for s in slots)
    # pack_dense works on every layer at once: one layer here.
    a_pack, b_pack = kernels.pack_dense(case.lora_a[None], case.lora_b[None], slots, rank,
                                        case.slice_sizes)
    mask = kernels.dense_mask(t2s, slots, rank, case.scales.tolist(), len(case.slice_sizes),
                              [case.ranks[s] for s in slots])
    return a_pack[0], b_pack[0], mask
