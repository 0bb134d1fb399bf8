"""Segmented multi-LoRA shrink and expand in Triton (SGMV, after Punica and vLLM's LoRA ops).

Each program takes one (tile of one slot's segment, slice, output tile). Its rows are token
indices gathered through `meta.sorted_token_ids`, so x and y are read and written in place,
with no sorted copy; tokens with slot -1 lie in no segment and no program touches them.

Rank: padding, not per-slot rank masking. The slot tables are zero-padded past each
adapter's rank up to `max_rank`, and the kernels tile over `max_rank` (one tile of at least
16, masked past `max_rank`). The zeros make the arithmetic exact without a rank table in the
public signature, every slot takes the same tile shapes (one compiled kernel per shape, no
per-slot branching) and a tile of 16 is the smallest `tl.dot` takes anyway, so ranks 4..16
cost the same. The price is reading zeros for small-rank adapters when a rank-64 one shares
the table; the runtime keeps that bounded by sizing `max_rank` to the largest rank it serves.

Precision: float32 accumulation always. The shrink writes float32 (scaled) and the expand
reads it back; y is loaded, added to in float32 and rounded once. Under the interpreter every
operand is upcast to float32 before `tl.dot` (its bfloat16 dot is wrong); on a GPU float16
and bfloat16 go to the tensor cores as they are, and float32 uses IEEE (not TF32) dots.

The kernels use builtins only (`tl.full`, integer division), not the `@jit` helpers of
triton.language.standard (`tl.zeros`, `tl.cdiv`): those are frozen into compiled or interpreted
form when triton is imported, and the interpreter must work whatever the import order.

Tiles come from a small table keyed by batch size (`_shrink_config`, `_expand_config`), not
from multi-config autotuning, so the interpreter runs the same kernels. Decode-sized batches
(few tokens per slot) take BLOCK_M=16 and a deep split-K over the input features so that
the shrink still fills the GPU; prefill takes larger M tiles and less split.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from kernels.metadata import LoraMeta

_DECODE_MAX_TOKENS = 128  # at or under this many tokens a batch is treated as decode


# Triton reads a kernel's parameter annotations (tl.constexpr, dtype hints) to specialise
# it: the two kernels keep only the annotations Triton itself wants.
def _shrink_kernel(  # type: ignore[no-untyped-def]
    x_ptr, a_ptr, scales_ptr, out_ptr,
    sorted_ids_ptr, counts_ptr, starts_ptr, active_ptr,
    in_features, max_rank,
    stride_xm, stride_xk,
    stride_aj, stride_as, stride_ar, stride_ak,
    stride_oj, stride_om, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # out[j, i, :] (+)= scales[s] * x[i] @ lora_a[j, s].T over this program's K share.
    pid = tl.program_id(0)
    j = tl.program_id(1)
    slot = tl.load(active_ptr + tl.program_id(2))
    if slot < 0:
        return
    num_n = (max_rank + BLOCK_N - 1) // BLOCK_N
    pid_sk = pid % SPLIT_K
    pid_n = (pid // SPLIT_K) % num_n
    pid_m = pid // (SPLIT_K * num_n)
    count = tl.load(counts_ptr + slot)
    m_start = pid_m * BLOCK_M
    if m_start >= count:
        return
    seg_start = tl.load(starts_ptr + slot)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    rows = tl.load(sorted_ids_ptr + seg_start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < max_rank
    offs_k = pid_sk * BLOCK_K + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_base = a_ptr + j.to(tl.int64) * stride_aj + slot.to(tl.int64) * stride_as
    a_ptrs = a_base + offs_n[None, :] * stride_ar + offs_k[:, None] * stride_ak  # [K, N]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k in range(0, (in_features + BLOCK_K * SPLIT_K - 1) // (BLOCK_K * SPLIT_K)):
        k_mask = offs_k < in_features - k * BLOCK_K * SPLIT_K
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc=acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * SPLIT_K * stride_xk
        a_ptrs += BLOCK_K * SPLIT_K * stride_ak
    acc *= tl.load(scales_ptr + slot)
    out_ptrs = out_ptr + j * stride_oj + rows[:, None] * stride_om + offs_n[None, :] * stride_or
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask)


def _expand_kernel(  # type: ignore[no-untyped-def]  # annotations: see _shrink_kernel
    h_ptr, b_ptr, y_ptr,
    sorted_ids_ptr, counts_ptr, starts_ptr, active_ptr,
    slice_sizes_ptr, slice_offsets_ptr,
    max_rank, max_slice,
    stride_hj, stride_hm, stride_hr,
    stride_bj, stride_bs, stride_bn, stride_br,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # y[i, off_j + n] += h[j, i] @ lora_b[j, s, n].T for this program's n tile of slice j.
    pid = tl.program_id(0)
    j = tl.program_id(1)
    slot = tl.load(active_ptr + tl.program_id(2))
    if slot < 0:
        return
    num_n = (max_slice + BLOCK_N - 1) // BLOCK_N
    pid_n = pid % num_n
    pid_m = pid // num_n
    n_j = tl.load(slice_sizes_ptr + j)
    count = tl.load(counts_ptr + slot)
    m_start = pid_m * BLOCK_M
    if m_start >= count:
        return
    if pid_n * BLOCK_N >= n_j:  # a narrower slice than the widest: no columns here
        return
    seg_start = tl.load(starts_ptr + slot)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    rows = tl.load(sorted_ids_ptr + seg_start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_j
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + j * stride_hj + rows[:, None] * stride_hm + offs_k[None, :] * stride_hr
    b_base = b_ptr + j.to(tl.int64) * stride_bj + slot.to(tl.int64) * stride_bs
    b_ptrs = b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_br  # [K, N]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k in range(0, (max_rank + BLOCK_K - 1) // BLOCK_K):
        k_mask = offs_k < max_rank - k * BLOCK_K
        ht = tl.load(h_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            bt = bt.to(tl.float32)
        else:
            # Tensor-core dot in the weights' dtype; the rank-sized float32 input is rounded
            # once, the sum over the rank still accumulates in float32.
            ht = ht.to(bt.dtype)
        acc = tl.dot(ht, bt, acc=acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K * stride_hr
        b_ptrs += BLOCK_K * stride_br
    off_j = tl.load(slice_offsets_ptr + j)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + (off_j + offs_n)[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    yt = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (yt.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _compiled(name: str, interpret: bool) -> Any:  # triton's function objects are untyped
    """One jitted kernel per mode, built here rather than by `@triton.jit` at import, whose
    choice of interpreter is frozen by TRITON_INTERPRET at import time."""
    fn = {"shrink": _shrink_kernel, "expand": _expand_kernel}[name]
    return InterpretedFunction(fn) if interpret else JITFunction(fn)


@functools.cache
def _slice_tables(
    slice_sizes: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice widths and offsets as device tensors, made once per layout: a copy from the host
    at every call would break CUDA-graph capture."""
    offsets = [sum(slice_sizes[:j]) for j in range(len(slice_sizes))]
    return (torch.tensor(slice_sizes, dtype=torch.int32, device=device),
            torch.tensor(offsets, dtype=torch.int32, device=device))  # fmt: skip


def _pow2_at_least_16(n: int) -> int:
    return max(16, int(triton.next_power_of_2(n)))


def _shrink_config(num_tokens: int, in_features: int, max_rank: int) -> dict[str, int]:
    block_n = min(64, _pow2_at_least_16(max_rank))
    if num_tokens <= _DECODE_MAX_TOKENS:
        block_m, block_k, split_k, warps, stages = 16, 256, 8, 4, 2
    else:
        block_m, block_k, split_k, warps, stages = 64, 128, 4, 4, 3
    block_k = min(block_k, _pow2_at_least_16(in_features))
    split_k = max(1, min(split_k, triton.cdiv(in_features, block_k)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                num_warps=warps, num_stages=stages)  # fmt: skip


def _expand_config(num_tokens: int, max_slice: int, max_rank: int) -> dict[str, int]:
    block_k = min(64, _pow2_at_least_16(max_rank))
    if num_tokens <= _DECODE_MAX_TOKENS:
        block_m, block_n, warps, stages = 16, 128, 4, 2
    else:
        block_m, block_n, warps, stages = 64, 128, 4, 3
    block_n = min(block_n, _pow2_at_least_16(max_slice))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=warps, num_stages=stages)  # fmt: skip


def _grid_extent(meta: LoraMeta, block_m: int, interpret: bool) -> tuple[int, int]:
    """(row tiles, slot programs). On a GPU both cover the worst case, so the launch needs
    no host sync and a captured graph replays for any token->slot map; under the
    interpreter, where every idle program costs Python time, the host counts trim them."""
    if not interpret:
        return triton.cdiv(max(meta.num_tokens, 1), block_m), meta.num_slots
    segments = meta.host_segments()
    if not segments:
        return 0, 0
    return triton.cdiv(max(c for _, _, c in segments), block_m), len(segments)


def _precision(dtype: torch.dtype, interpret: bool) -> tuple[bool, str]:
    dot_fp32 = interpret or dtype == torch.float32
    return dot_fp32, "ieee" if dot_fp32 else "tf32"


def lora_shrink(
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slices, num_slots, max_rank, in]
    scales: torch.Tensor,  # [num_slots] float32
    meta: LoraMeta,
    out: torch.Tensor | None,  # [num_slices, num_tokens, max_rank] float32, zeroed
    *,
    interpret: bool,
    config: dict[str, int] | None = None,
) -> torch.Tensor:  # [num_slices, num_tokens, max_rank] float32
    num_slices, _, max_rank, in_features = lora_a.shape
    if out is None:
        out = torch.zeros(num_slices, x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    cfg = config or _shrink_config(x.shape[0], in_features, max_rank)
    m_tiles, slot_programs = _grid_extent(meta, cfg["BLOCK_M"], interpret)
    if m_tiles == 0:
        return out
    dot_fp32, precision = _precision(x.dtype, interpret)
    grid = (cfg["SPLIT_K"] * triton.cdiv(max_rank, cfg["BLOCK_N"]) * m_tiles, num_slices,
            slot_programs)  # fmt: skip
    _compiled("shrink", interpret)[grid](
        x, lora_a, scales, out,
        meta.sorted_token_ids, meta.num_tokens_per_slot, meta.slot_starts, meta.active_slots,
        in_features, max_rank,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), lora_a.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        DOT_FP32=dot_fp32, PRECISION=precision, **cfg,
    )  # fmt: skip
    return out


def lora_expand(
    y: torch.Tensor,  # [num_tokens, sum(slice_sizes)]
    h: torch.Tensor,  # [num_slices, num_tokens, max_rank] float32
    lora_b: torch.Tensor,  # [num_slices, num_slots, max_out, max_rank]
    meta: LoraMeta,
    slice_sizes: list[int],
    *,
    interpret: bool,
    config: dict[str, int] | None = None,
) -> None:
    num_slices, _, _, max_rank = lora_b.shape
    max_slice = max(slice_sizes)
    cfg = config or _expand_config(y.shape[0], max_slice, max_rank)
    m_tiles, slot_programs = _grid_extent(meta, cfg["BLOCK_M"], interpret)
    if m_tiles == 0:
        return
    sizes_t, offsets_t = _slice_tables(tuple(slice_sizes), y.device)
    dot_fp32, precision = _precision(lora_b.dtype, interpret)
    grid = (triton.cdiv(max_slice, cfg["BLOCK_N"]) * m_tiles, num_slices, slot_programs)
    _compiled("expand", interpret)[grid](
        h, lora_b, y,
        meta.sorted_token_ids, meta.num_tokens_per_slot, meta.slot_starts, meta.active_slots,
        sizes_t, offsets_t,
        max_rank, max_slice,
        h.stride(0), h.stride(1), h.stride(2),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), lora_b.stride(3),
        y.stride(0), y.stride(1),
        DOT_FP32=dot_fp32, PRECISION=precision, **cfg,
    )  # fmt: skip
