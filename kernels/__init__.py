"""Batched multi-LoRA ops: every token of one batch against its own adapter.

    for every token i with slot s = token_to_slot[i] >= 0 and every slice j:
        y[i, off_j : off_j + n_j] += scales[s] * (x[i] @ lora_a[j, s].T) @ lora_b[j, s, :n_j].T

Two phases, as in Punica (SGMV) and vLLM's Triton LoRA ops: `lora_shrink` (x down to the
rank, float32) and `lora_expand` (rank back up, added into y in place); `add_lora` runs both.
Dispatch, decided per call:
- CUDA tensors run the Triton kernels (`kernels.triton_lora`);
- CPU tensors with TRITON_INTERPRET=1 in the environment run the same kernels under Triton's
  interpreter (read at call time, so it need not be set before `import kernels`);
- other CPU tensors take the vectorized torch path (`kernels.torch_lora`).
Triton is imported only when a Triton path is taken, so `import kernels` works without it.

The torch path also has a dense form for steps with few adapters over many tokens (decode):
`pack_dense` packs the active slots' weights once (for every layer), `dense_mask` holds each
token's scale, and `add_lora_dense` adds a projection's whole LoRA term in three calls
(`kernels.torch_lora` explains why it is exact), or in one native op on the CPU in float32
or bf16 (`kernels/csrc/lora_cpu.cpp`, built at first use by `kernels.native`). `backend(device)`
says which path a device's tensors take, so a caller can choose the dense form only where it
applies.
"""

from __future__ import annotations

import os

import torch

from kernels.metadata import LoraMeta, build_meta
from kernels.torch_lora import add_lora_dense, dense_mask, pack_dense

__all__ = [
    "LoraMeta", "add_lora", "add_lora_dense", "backend", "build_meta", "dense_mask",
    "lora_expand", "lora_shrink", "pack_dense",
]

_TRUE = {"1", "true", "yes", "on", "y"}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend(device: torch.device | str) -> str:
    """"triton" (CUDA), "interpret" (CPU under TRITON_INTERPRET=1) or "torch" (other CPU)."""
    if torch.device(device).type == "cuda":
        return "triton"
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE:
        return "interpret"
    return "torch"


def _backend(t: torch.Tensor) -> str:
    return backend(t.device)


def _check_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, scales: torch.Tensor, meta: LoraMeta
) -> None:
    if x.dim() != 2 or lora_a.dim() != 4:
        raise ValueError("x must be [num_tokens, in] and lora_a [num_slices, num_slots, r, in]")
    if x.dtype not in _DTYPES or lora_a.dtype != x.dtype:
        raise TypeError(f"x and lora_a must share one of {_DTYPES}, got {x.dtype}, {lora_a.dtype}")
    if lora_a.shape[3] != x.shape[1]:
        raise ValueError(f"lora_a has in={lora_a.shape[3]}, x has {x.shape[1]}")
    if lora_a.shape[1] != meta.num_slots or scales.shape != (meta.num_slots,):
        raise ValueError("lora_a and scales must have meta.num_slots slots")
    if x.shape[0] != meta.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens, meta {meta.num_tokens}")
    if x.device != lora_a.device or x.device != meta.device:
        raise ValueError("x, lora_a and meta must be on one device")


def _check_expand(
    y: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta, slice_sizes: list[int] | None
) -> list[int]:
    if y.dim() != 2 or lora_b.dim() != 4:
        raise ValueError("y must be [num_tokens, out] and lora_b [num_slices, num_slots, out, r]")
    if y.dtype not in _DTYPES or lora_b.dtype not in _DTYPES:
        raise TypeError(f"y and lora_b must be one of {_DTYPES}")
    sizes = [y.shape[1]] if slice_sizes is None else [int(n) for n in slice_sizes]
    if len(sizes) != lora_b.shape[0]:
        raise ValueError(f"{len(sizes)} slice sizes for {lora_b.shape[0]} slices of lora_b")
    if sum(sizes) != y.shape[1] or any(n < 1 or n > lora_b.shape[2] for n in sizes):
        max_out = lora_b.shape[2]
        raise ValueError(f"slice sizes {sizes} must be in [1, {max_out}] and sum to y's width")
    if lora_b.shape[1] != meta.num_slots or y.shape[0] != meta.num_tokens:
        raise ValueError("lora_b and y must match meta's slots and tokens")
    if y.device != lora_b.device or y.device != meta.device:
        raise ValueError("y, lora_b and meta must be on one device")
    return sizes


def lora_shrink(
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slices, num_slots, max_rank, in]
    scales: torch.Tensor,  # [num_slots] float32
    meta: LoraMeta,
    out: torch.Tensor | None = None,  # [num_slices, num_tokens, max_rank] float32
) -> torch.Tensor:  # [num_slices, num_tokens, max_rank] float32
    """out[j, i] = scales[s] * x[i] @ lora_a[j, s].T for tokens with slot s >= 0.

    Rows of tokens without an adapter are left as they are in `out` (zero when it is
    allocated here). A given `out` must be zeroed: the split-K kernel accumulates into it.
    """
    _check_shrink(x, lora_a, scales, meta)
    num_slices, _, max_rank, _ = lora_a.shape
    if out is None:
        out = torch.zeros(num_slices, x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    elif out.shape != (num_slices, x.shape[0], max_rank) or out.dtype != torch.float32:
        raise ValueError("out must be float32 [num_slices, num_tokens, max_rank]")
    scales = scales.to(device=x.device, dtype=torch.float32)
    backend = _backend(x)
    if backend == "torch":
        from kernels import torch_lora

        torch_lora.lora_shrink(x, lora_a, scales, meta, out)
    else:
        from kernels import triton_lora

        triton_lora.lora_shrink(x, lora_a, scales, meta, out, interpret=backend == "interpret")
    return out


def lora_expand(
    y: torch.Tensor,  # [num_tokens, sum(slice_sizes)]
    h: torch.Tensor,  # [num_slices, num_tokens, max_rank] float32, from lora_shrink
    lora_b: torch.Tensor,  # [num_slices, num_slots, max_out, max_rank]
    meta: LoraMeta,
    slice_sizes: list[int] | None = None,
) -> None:
    """y[i, off_j : off_j + n_j] += h[j, i] @ lora_b[j, s, :n_j].T, in place, slot s >= 0."""
    sizes = _check_expand(y, lora_b, meta, slice_sizes)
    if h.shape != (lora_b.shape[0], y.shape[0], lora_b.shape[3]):
        raise ValueError("h must be [num_slices, num_tokens, max_rank] matching lora_b")
    backend = _backend(y)
    if backend == "torch":
        from kernels import torch_lora

        torch_lora.lora_expand(y, h, lora_b, meta, sizes)
    else:
        from kernels import triton_lora

        triton_lora.lora_expand(y, h, lora_b, meta, sizes, interpret=backend == "interpret")


def add_lora(
    y: torch.Tensor,  # [num_tokens, sum(slice_sizes)]
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slices, num_slots, max_rank, in], zero past each rank
    lora_b: torch.Tensor,  # [num_slices, num_slots, max_out, max_rank], zero past each rank
    scales: torch.Tensor,  # [num_slots] float32
    meta: LoraMeta,
    slice_sizes: list[int] | None = None,
) -> None:
    """y[i, off_j : off_j + n_j] += scales[s] * (x[i] @ lora_a[j, s].T) @ lora_b[j, s, :n_j].T

    In place on `y`, for every token i with slot s >= 0 and every slice j (off_j is the sum
    of the slice sizes before j; `slice_sizes=None` means one slice as wide as y). Rows of
    tokens with slot -1 are not touched. Accumulation is float32 for every input dtype.
    """
    _check_shrink(x, lora_a, scales, meta)
    sizes = _check_expand(y, lora_b, meta, slice_sizes)
    if lora_a.shape[0] != lora_b.shape[0] or lora_a.shape[2] != lora_b.shape[3]:
        raise ValueError("lora_a and lora_b disagree on slices or max_rank")
    scales = scales.to(device=x.device, dtype=torch.float32)
    backend = _backend(x)
    if backend == "torch":
        from kernels import torch_lora

        torch_lora.add_lora(y, x, lora_a, lora_b, scales, meta, sizes)
        return
    from kernels import triton_lora

    h = triton_lora.lora_shrink(
        x, lora_a, scales, meta, None, interpret=backend == "interpret"
    )
    triton_lora.lora_expand(y, h, lora_b, meta, sizes, interpret=backend == "interpret")
