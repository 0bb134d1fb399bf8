"""Attention over the paged KV cache, and the per-step index tensors it needs.

Two paths, chosen once per engine (`use_paged_kernel`, `RuntimeConfig.attention`):
- CPU, "auto" (the default): decode tokens, and the tokens of short chunks over cached
  context (<= PAGED_PREFILL_MAX), are answered by a C++ kernel that reads K/V through the
  block tables directly (`paged_attention_cpu.py`, `csrc/paged_attention.cpp`): per step the
  metadata is the block tables and one length per query as small int32 tensors, and no
  context is copied. The kernel reads only the first `length` rows of each sequence, so
  another tenant's blocks, free blocks and stale rows never enter a sum.
- The gather path: gather each sequence's K/V rows through its block table (`kv_cache.py`
  has the layout), then `F.scaled_dot_product_attention`. Decode tokens of all sequences run
  as one padded batch with a length mask; each prefill chunk runs on its own with a causal
  mask offset by the tokens already cached. It serves CUDA (SDPA picks its fused backend;
  there is no CUDA paged decode kernel yet, so the gather costs one copy of the context per
  step), CPU runs with attention="gather" or where the kernel cannot build or does not take
  the model's shapes, longer prefill chunks on the CPU, and the tests as the kernel's oracle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.model import paged_attention_cpu

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first row of this chunk in the step's flattened tokens
    num_tokens: int
    gather: torch.Tensor  # [context_len] int64 pool rows of the whole context
    mask: torch.Tensor | None  # [1, 1, num_tokens, context_len] bool; None: plain causal


@dataclass(slots=True)
class PagedQueries:
    """Queries the CPU kernel answers straight from the block tables: query i attends to the
    first lens[i] positions of sequence seqs[i] (`paged_attention_cpu.py`)."""

    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, zero-padded past each length
    rows: torch.Tensor  # [num_queries] int32 rows of the step's flattened tokens
    seqs: torch.Tensor  # [num_queries] int32 row of block_tables of each query
    lens: torch.Tensor  # [num_queries] int32 context each query sees, itself included
    block_size: int


@dataclass(slots=True)
class AttentionMetadata:
    """Built once per step, shared by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V goes
    decode_rows: torch.Tensor | None  # [num_decode] int64 rows of the flattened tokens
    # [num_decode, max_context] int64 pool rows, padded with each sequence's own last row
    decode_gather: torch.Tensor | None
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_context] bool, True = attend
    prefills: list[PrefillChunk]
    paged: PagedQueries | None = None  # set: the kernel answers these, the gather the rest


# A prefill chunk over cached context of at most this many tokens goes to the kernel
# (one query per token, each reading its context through the block table); longer chunks
# keep the gather and SDPA, whose GEMMs reuse each K/V row across the chunk's tokens. One
# sequence, SmolLM2 shapes, one thread, per layer (`bench.attention_ab`, op): 4 tokens over
# 512 take 0.12 ms in the kernel and 0.18 ms gathered, 8 tokens 0.23 against 0.23, 16 tokens
# 0.46 against 0.35.
PAGED_PREFILL_MAX = 4


def use_paged_kernel(
    backend: str,  # RuntimeConfig.attention: "auto" or "gather"
    device: torch.device,
    kv_dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> bool:
    """Whether this engine's steps read the block tables through the CPU kernel: "auto" on a
    CPU device, with shapes the kernel takes, once it has built (else the gather path, and
    `paged_attention_cpu.load` has logged why)."""
    if backend != "auto" or device.type != "cpu":
        return False
    if not paged_attention_cpu.supports(num_heads, num_kv_heads, head_dim, kv_dtype):
        _log.info("CPU paged attention kernel does not take %d heads over %d kv heads of %d "
                  "(%s); using the gather path", num_heads, num_kv_heads, head_dim, kv_dtype)
        return False
    return paged_attention_cpu.load() is not None


def build_metadata(
    seqs: list[tuple[list[int], int, int]],  # (block_table, num_cached, num_new) in batch order
    block_size: int,
    device: torch.device | str,
    paged: bool = False,
    paged_prefill_max: int = PAGED_PREFILL_MAX,
) -> AttentionMetadata:
    """Index tensors for one step. A sequence with num_new == 1 counts as decode.

    `paged` (`use_paged_kernel` said yes): decode tokens, and those of chunks over cached
    context of at most PAGED_PREFILL_MAX tokens, go to the kernel as block tables and lengths
    (no [num_decode, max_context] indexes or masks); the other chunks take the gather path.
    """
    # Plain Python for the per-token indexes: for a step's few hundred tokens it is cheaper
    # than building many small tensors.
    slots: list[int] = []
    decode: list[tuple[int, list[int], int]] = []
    prefills: list[PrefillChunk] = []
    paged_tables: list[list[int]] = []  # the kernel's queries: tables, rows, seqs, lengths
    rows_k: list[int] = []
    seqs_k: list[int] = []
    lens_k: list[int] = []
    offsets = torch.arange(block_size)
    row = 0
    for block_table, num_cached, num_new in seqs:
        context = num_cached + num_new
        slots += [block_table[p // block_size] * block_size + p % block_size
                  for p in range(num_cached, context)]
        if paged and (num_new == 1 or 0 < num_cached and num_new <= paged_prefill_max):
            rows_k += range(row, row + num_new)
            seqs_k += [len(paged_tables)] * num_new
            lens_k += range(num_cached + 1, context + 1)  # causal: token p sees 0..p
            paged_tables.append(block_table[: (context + block_size - 1) // block_size])
        elif num_new == 1:
            decode.append((row, block_table, context))
        else:
            table = torch.tensor(block_table[: (context + block_size - 1) // block_size])
            rows = (table[:, None] * block_size + offsets).reshape(-1)[:context]
            mask = None
            if num_cached:
                q_pos = torch.arange(num_cached, context)[:, None]
                mask = (torch.arange(context)[None, :] <= q_pos)[None, None]
                mask = mask.to(device)
            prefills.append(PrefillChunk(row, num_new, rows.to(device), mask))
        row += num_new
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    meta = AttentionMetadata(slot_mapping, None, None, None, prefills)
    if paged_tables:
        width = max(map(len, paged_tables))
        meta.paged = PagedQueries(
            torch.tensor([t + [0] * (width - len(t)) for t in paged_tables], dtype=torch.int32),
            torch.tensor(rows_k, dtype=torch.int32), torch.tensor(seqs_k, dtype=torch.int32),
            torch.tensor(lens_k, dtype=torch.int32), block_size,
        )
    if decode:
        max_blocks = max((ctx + block_size - 1) // block_size for _, _, ctx in decode)
        tables = torch.tensor([
            (bt[: (ctx + block_size - 1) // block_size] + [0] * max_blocks)[:max_blocks]
            for _, bt, ctx in decode
        ])
        gather = (tables[:, :, None] * block_size + offsets).reshape(len(decode), -1)
        lengths = torch.tensor([ctx for _, _, ctx in decode])
        mask = torch.arange(gather.shape[1])[None, :] < lengths[:, None]
        # Isolation: a masked position still enters SDPA (probability 0 times its value), and
        # 0 * NaN is NaN. So every position past a sequence's length gathers that sequence's
        # own last row, never another sequence's block, nor a stale row of its own last block.
        last = gather.gather(1, (lengths - 1)[:, None])  # [num_decode, 1]
        gather = torch.where(mask, gather, last)
        meta.decode_rows = torch.tensor([r for r, _, _ in decode]).to(device)
        meta.decode_gather = gather.to(device)
        meta.decode_mask = mask[:, None, None, :].to(device)
    return meta


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_pool: torch.Tensor,  # [pool_rows, num_kv_heads, head_dim] (this layer, new K written)
    v_pool: torch.Tensor,  # [pool_rows, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if meta.paged is not None:
        op = paged_attention_cpu.load()
        assert op is not None  # paged is set only where use_paged_kernel said yes
        p = meta.paged
        paged_attention_cpu.paged_attention_cpu(
            op, q, k_pool, v_pool, p.block_tables, p.rows, p.seqs, p.lens, out, p.block_size,
            scale,
        )
    if meta.decode_rows is not None:
        assert meta.decode_gather is not None and meta.decode_mask is not None  # set together
        qd = q.index_select(0, meta.decode_rows).unsqueeze(2)  # [B, heads, 1, dim]
        batch, ctx = meta.decode_gather.shape
        flat = meta.decode_gather.view(-1)
        # index_select on the flattened rows is several times faster than 2-D fancy indexing.
        k = k_pool.index_select(0, flat).view(batch, ctx, *k_pool.shape[1:]).transpose(1, 2)
        v = v_pool.index_select(0, flat).view(batch, ctx, *v_pool.shape[1:]).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qd, k, v, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True
        )
        out.index_copy_(0, meta.decode_rows, o.squeeze(2))
    for chunk in meta.prefills:
        end = chunk.start + chunk.num_tokens
        qp = q[chunk.start : end].transpose(0, 1).unsqueeze(0)  # [1, heads, n, dim]
        k = k_pool.index_select(0, chunk.gather).transpose(0, 1).unsqueeze(0)  # [1, kvh, ctx, dim]
        v = v_pool.index_select(0, chunk.gather).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qp, k, v, attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale,
            enable_gqa=True,
        )
        out[chunk.start : end] = o[0].transpose(0, 1)
    return out
