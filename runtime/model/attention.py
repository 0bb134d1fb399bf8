"""Attention over the paged KV cache, and the per-step index tensors it needs.

Path (the same on CPU and CUDA): gather each sequence's K/V rows through its block table
(`kv_cache.py` has the layout), then `F.scaled_dot_product_attention`. Decode tokens of all
sequences run as one padded batch with a length mask; each prefill chunk runs on its own with
a causal mask offset by the tokens already cached. On CUDA, SDPA picks its fused backend;
there is no custom paged decode kernel yet, so the gather costs one copy of the context per
step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first row of this chunk in the step's flattened tokens
    num_tokens: int
    gather: torch.Tensor  # [context_len] int64 pool rows of the whole context
    mask: torch.Tensor | None  # [1, 1, num_tokens, context_len] bool; None: plain causal


@dataclass(slots=True)
class AttentionMetadata:
    """Built once per step, shared by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V goes
    decode_rows: torch.Tensor | None  # [num_decode] int64 rows of the flattened tokens
    # [num_decode, max_context] int64 pool rows, padded with each sequence's own last row
    decode_gather: torch.Tensor | None
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_context] bool, True = attend
    prefills: list[PrefillChunk]


def build_metadata(
    seqs: list[tuple[list[int], int, int]],  # (block_table, num_cached, num_new) in batch order
    block_size: int,
    device: torch.device | str,
) -> AttentionMetadata:
    """Index tensors for one step. A sequence with num_new == 1 counts as decode."""
    # Plain Python for the per-token indexes: for a step's few hundred tokens it is cheaper
    # than building many small tensors.
    slots: list[int] = []
    decode: list[tuple[int, list[int], int]] = []
    prefills: list[PrefillChunk] = []
    offsets = torch.arange(block_size)
    row = 0
    for block_table, num_cached, num_new in seqs:
        context = num_cached + num_new
        slots += [block_table[p // block_size] * block_size + p % block_size
                  for p in range(num_cached, context)]
        if num_new == 1:
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
    out = torch.empty_like(q)
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
