"""The vectorized torch path of the multi-LoRA ops, for CPU tensors outside the interpreter.

Tokens are gathered once into slot order (`meta.sorted_token_ids`), so each active slot's
tokens are one contiguous block; every block then takes one matmul per slice against its
adapter's weights, used in place (views, no per-token weight copies as in gather-then-bmm).
The Python loop runs over active slots and slices, never over tokens: its cost grows with the
number of distinct adapters in the step, while the arithmetic is the same as one big matmul.
So in `add_lora` the short segments (decode: a token or a few per adapter) are batched
instead when that pays: padded to the longest of them and run as one bmm per slice against
the slot table's range as a view (no weight copies), which keeps a step over 64 distinct
adapters near the cost of a step over one. Long segments (prefill) keep the loop, where
padding would waste work.
Accumulation is float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from kernels import native
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
            block = delta[start : start + count, off : off + n]
            if block.is_contiguous():  # one slice: write in place, no temporary
                torch.matmul(h[j, start : start + count], b.t(), out=block)
            else:
                block.copy_(h[j, start : start + count] @ b.t())
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
    # FLOPs one padded row costs in the table bmm (shrink over every slice, then expand).
    row_flops = 2 * lora_a.shape[2] * (lora_a.shape[0] * lora_a.shape[3] + sum(slice_sizes))
    max_tokens = _PAD_MAX_TOKENS if row_flops > _SMALL_ROW_FLOPS else _PAD_MAX_TOKENS_SMALL
    short = [seg for seg in segments if seg[2] <= max_tokens]
    if not _table_pays(short, row_flops):
        short = []
    long = [seg for seg in segments if seg[2] > max_tokens] if short else segments
    if long:
        delta = _expand_sorted(_shrink_sorted(xs, lora_a, scales, long), lora_b, slice_sizes, long)
    else:
        delta = torch.empty(xs.shape[0], sum(slice_sizes), dtype=torch.float32, device=xs.device)
    if short:
        _table_into(delta, xs, lora_a, lora_b, scales, slice_sizes, short)
    _add_rows(y, rows, delta)


# Segments up to this long may be batched by padding. Measured on 2 cores (r=16, 64 slots):
# with 1-4 tokens per adapter the table bmm beats the loop (1.8 vs 2.2 ms at hidden 1024, even
# at 4096); at 16 tokens per adapter the loop wins (2.5 vs 3.4 ms at 4096).
_PAD_MAX_TOKENS = 4
_PAD_MIN_SEGMENTS = 4  # fewer short segments than this: the loop is as cheap
# Small adapters (row_flops up to this, e.g. hidden 128-256 at r <= 16): a loop iteration's
# dispatch costs more than many padded rows, so longer segments (short prompts) pad too.
_SMALL_ROW_FLOPS = 1 << 15
_PAD_MAX_TOKENS_SMALL = 24  # prompts of up to 24 tokens prefill in one bmm
_LOOP_SEGMENT_FLOPS = 1e6  # ~ one loop iteration's dispatch overhead, in FLOPs of bmm


def _table_pays(short: list[tuple[int, int, int]], row_flops: int) -> bool:
    """Whether one padded bmm over the slot range of `short` beats a loop over them.

    The padded input is [slots in range, longest segment, in]. Its padding rows (inactive
    slots in the range, shorter segments) are wasted work: worth it while at most half of
    its rows are padding, or while the padding costs less than the loop's per-segment
    dispatch it saves (small adapters, where a sparse slot range is still cheap).
    """
    if len(short) < _PAD_MIN_SEGMENTS:
        return False
    num_range = short[-1][0] - short[0][0] + 1
    width = max(c for _, _, c in short)
    tokens = sum(c for _, _, c in short)
    waste = num_range * width - tokens
    return waste <= tokens or waste * row_flops <= len(short) * _LOOP_SEGMENT_FLOPS


def _table_into(
    delta: torch.Tensor,  # [num_lora_tokens, sum(slice_sizes)] float32, rows written here
    xs: torch.Tensor,  # [num_lora_tokens, in] float32, slot order
    lora_a: torch.Tensor,  # [num_slices, num_slots, max_rank, in]
    lora_b: torch.Tensor,  # [num_slices, num_slots, max_out, max_rank]
    scales: torch.Tensor,  # [num_slots] float32
    slice_sizes: list[int],
    segments: list[tuple[int, int, int]],  # in slot order
) -> None:
    """delta rows of `segments` = the LoRA term, as one padded bmm per slice and phase.

    The bmm runs against the slot table's own contiguous range [first slot, last slot] as a
    view: no adapter's weights are copied (a gather of per-segment weights would cost more
    than the loop it replaces once the weights are large).
    """
    device = xs.device
    lo, hi = segments[0][0], segments[-1][0] + 1
    counts = torch.tensor([c for _, _, c in segments], device=device)
    starts = torch.tensor([st for _, st, _ in segments], device=device)
    seg = torch.repeat_interleave(torch.arange(len(segments), device=device), counts)
    # Position in its segment, without a Python loop over segments.
    pos = torch.arange(seg.shape[0], device=device) - (torch.cumsum(counts, 0) - counts)[seg]
    src = starts[seg] + pos  # row in xs / delta
    slot_of = torch.tensor([s - lo for s, _, _ in segments], device=device)[seg]
    width = int(counts.max())
    xp = xs.new_zeros(hi - lo, width, xs.shape[1])  # [slots in range, width, in]
    # When every segment is short, src covers xs in order: skip a copy of it.
    xp[slot_of, pos] = xs if src.shape[0] == xs.shape[0] else xs.index_select(0, src)
    scale = scales[lo:hi].view(-1, 1, 1)
    off = 0
    for j, n in enumerate(slice_sizes):
        a = lora_a[j, lo:hi].to(torch.float32)  # [slots in range, max_rank, in], a view
        h = torch.bmm(xp, a.transpose(1, 2)).mul_(scale)  # [slots in range, width, max_rank]
        b = lora_b[j, lo:hi, :n].to(torch.float32)  # [slots in range, n, max_rank]
        delta[src, off : off + n] = torch.bmm(h, b.transpose(1, 2))[slot_of, pos]
        off += n


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


# -- the dense path: a whole projection's LoRA term in three calls --------------------------
#
# A decode step mixes a few adapters over a few dozen tokens. The segment loop above then
# pays one matmul per (adapter, slice, phase), each ~0.1 ms of dispatch for microseconds of
# arithmetic (840 of them per SmolLM2 step with two adapters). The dense path instead runs
# every token of the step against the step's active adapters packed side by side:
#
#     h = x @ A_pack.T              # [num_tokens, num_slices * width], width = slots * rank
#     h *= mask                     # scale of the token's own slot at its rank columns, else 0
#     y += h @ B_pack               # B_pack block-diagonal over slices: one GEMM for q, k, v
#
# Rows of other adapters contribute exact zeros (0 * finite = 0, and adding 0 changes no
# sum), so each token gets scale[s] * (x @ A[s].T) @ B[s].T as the loop computes it, and a
# token without an adapter gets y + 0 = y. The waste is the zero columns, which the caller
# keeps small (runtime/lora/layers.py decides per step and projection by FLOPs).
#
# On the CPU in float32 and bf16 the three calls are one native op (csrc/lora_cpu.cpp): the
# same sums over each token's nonzero mask columns only, with no small-GEMM overhead, so
# neither the zero columns nor b_pack's zero blocks cost anything there (3-4x less time on
# SmolLM2's decode shapes, bench/lora_kernels.py --dense). The three calls stay its fallback
# and oracle.


def pack_dense(
    lora_a: torch.Tensor,  # [num_layers, num_slices, num_slots, max_rank, in]
    lora_b: torch.Tensor,  # [num_layers, num_slices, num_slots, max_out, max_rank]
    slots: list[int],  # the step's active slots, ascending
    rank: int,  # the largest rank among them (columns past it are zero in every table)
    slice_sizes: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 copies of the active slots' weights, laid out for `add_lora_dense`.

    Returns a_pack [num_layers, num_slices * width, in] and b_pack [num_layers, num_slices *
    width, sum(slice_sizes)] with width = len(slots) * rank; column c = (j * len(slots) + k)
    * rank + r holds slice j, slot slots[k], rank row r. b_pack is zero off the diagonal
    blocks (slice j's rows feed only slice j's output columns).
    """
    num_layers, num_slices = lora_a.shape[:2]
    index = torch.tensor(slots, device=lora_a.device)
    a = lora_a.index_select(2, index)[:, :, :, :rank].to(torch.float32)
    a_pack = a.reshape(num_layers, num_slices * len(slots) * rank, lora_a.shape[-1])
    width = len(slots) * rank
    bt = lora_b.index_select(2, index)[..., :rank].transpose(-1, -2)  # [L, J, k, rank, max_out]
    b_pack = torch.zeros(num_layers, num_slices, width, sum(slice_sizes), dtype=torch.float32,
                         device=lora_b.device)
    off = 0
    for j, n in enumerate(slice_sizes):
        b_pack[:, j, :, off : off + n] = bt[:, j, :, :, :n].reshape(num_layers, width, n)
        off += n
    return a_pack.contiguous(), b_pack.view(num_layers, num_slices * width, -1)


def dense_mask(
    token_to_slot: list[int],  # [num_tokens], -1 = base model
    slots: list[int],  # as given to pack_dense
    rank: int,
    scales: list[float],  # [num_slots]
    num_slices: int,
    ranks: list[int] | None = None,  # [len(slots)] each slot's own rank; None: all `rank`
) -> torch.Tensor:  # [num_tokens, num_slices * len(slots) * rank] float32, on the host
    """mask[i, (j * len(slots) + k) * rank + r] = scales[s] where token i has slot s =
    slots[k] and r < ranks[k], for every slice j; 0 everywhere else.

    The rows of a slot past its own rank are zero in the packs (an r8 adapter beside an r16
    one), so their terms are exact zeros either way; a zero mask there lets the native op
    skip them (it reads only a token's nonzero columns): a quarter of qkv's LoRA work in a
    step of one r8 and one r16 adapter."""
    pos = {s: k for k, s in enumerate(slots)}
    rows = [i for i, s in enumerate(token_to_slot) if s >= 0]
    mask = torch.zeros(len(token_to_slot), len(slots), rank)
    if rows:
        cols = [pos[token_to_slot[i]] for i in rows]
        values = torch.tensor([scales[token_to_slot[i]] for i in rows], dtype=torch.float32)
        mask[rows, cols] = values[:, None]
        for k, own in enumerate(ranks or ()):
            mask[:, k, min(own, rank):] = 0.0
    return mask.view(len(token_to_slot), -1).repeat(1, num_slices)


def add_lora_dense(
    y: torch.Tensor,  # [num_tokens, sum(slice_sizes)]
    x: torch.Tensor,  # [num_tokens, in]
    a_pack: torch.Tensor,  # [num_slices * width, in] float32, one layer of pack_dense
    b_pack: torch.Tensor,  # [num_slices * width, sum(slice_sizes)] float32
    mask: torch.Tensor,  # [num_tokens, num_slices * width] float32, from dense_mask
    slice_sizes: list[int] | None = None,  # as given to pack_dense; None: one slice
) -> None:
    """y += ((x @ a_pack.T) * mask) @ b_pack, in place, rounding once to y's dtype.

    On the CPU with float32 contiguous tensors this runs the native op (csrc/lora_cpu.cpp)
    when it builds: the same sums, token by token over the nonzero columns of its mask only
    (so within float32 rounding of the torch form, and a column of another adapter never
    enters a token's row); with bfloat16 x and y (`--dtype bfloat16`), the op sums into a
    float32 term it adds to y once. Otherwise, and as its oracle, the torch form.
    """
    op = _native_op() if _native_fits(y, x, a_pack, b_pack, mask) else None
    if op is not None:
        op(y, x, a_pack, b_pack, mask, [y.shape[1]] if slice_sizes is None else slice_sizes)
        return
    add_lora_dense_torch(y, x, a_pack, b_pack, mask)


def add_lora_dense_torch(
    y: torch.Tensor,  # [num_tokens, sum(slice_sizes)]
    x: torch.Tensor,  # [num_tokens, in]
    a_pack: torch.Tensor,  # [num_slices * width, in] float32
    b_pack: torch.Tensor,  # [num_slices * width, sum(slice_sizes)] float32
    mask: torch.Tensor,  # [num_tokens, num_slices * width] float32
) -> None:
    """add_lora_dense in three torch calls, whatever the dtypes and devices."""
    h = torch.mm(x.to(torch.float32), a_pack.t()).mul_(mask)
    if y.dtype == torch.float32:
        y.addmm_(h, b_pack)
    else:
        y.add_(torch.mm(h, b_pack))


def _native_fits(y: torch.Tensor, x: torch.Tensor, *packs: torch.Tensor) -> bool:
    """CPU, contiguous, float32 packs and mask, and y and x both float32 or both bfloat16."""
    # Plain checks of cheap attributes: ~1 us for five tensors, where all() over a generator
    # reading `.device.type` took ~5 us, 120 times per decode step.
    if y.dtype is not x.dtype or y.dtype not in _NATIVE_DTYPES:
        return False
    for t in (y, x, *packs):
        if not t.is_cpu or not t.is_contiguous():
            return False
    for t in packs:
        if t.dtype is not torch.float32:
            return False
    return True


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)
_NATIVE_SOURCES = [Path(__file__).with_name("csrc") / "lora_cpu.cpp"]


@functools.cache
def _native_op() -> Callable[..., None] | None:
    """`torch.ops.loragate_kernels.add_lora_dense`, built on the first call of the process;
    None (logged once, with why) when it cannot be built."""
    if not native.load_library("loragate_lora_cpu", _NATIVE_SOURCES):
        return None
    op: Callable[..., None] = torch.ops.loragate_kernels.add_lora_dense
    return op
