"""Paged KV cache: fixed-size blocks in one pool per layer.

Layout: per layer, K and V are `[num_blocks * block_size, num_kv_heads, head_dim]`; token `p`
of a sequence lives at row `block_table[p // block_size] * block_size + p % block_size`.
Which blocks a sequence holds is decided by `runtime/scheduling/block_manager.py`
(torch-free); this module only stores, and `attention.py` reads through block tables.
"""

from __future__ import annotations

import torch

from runtime.model.weights import ModelArgs


def bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * args.num_layers * block_size * args.num_kv_heads * args.head_dim * elem


class KVCache:
    def __init__(
        self,
        args: ModelArgs,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache budget does not fit a single block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (args.num_layers, num_blocks * block_size, args.num_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(
        self,
        layer: int,
        slot_mapping: torch.Tensor,  # [num_tokens] int64 rows of the pool
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    ) -> None:
        self.k[layer].index_copy_(0, slot_mapping, k)
        self.v[layer].index_copy_(0, slot_mapping, v)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (src, dst) block's K and V in every layer: the copy-on-write of a fork."""
        if not pairs:
            return
        bs = self.block_size
        offsets = torch.arange(bs, device=self.k.device)
        src = torch.tensor([s for s, _ in pairs], device=self.k.device)[:, None] * bs + offsets
        dst = torch.tensor([d for _, d in pairs], device=self.k.device)[:, None] * bs + offsets
        src, dst = src.flatten(), dst.flatten()  # [len(pairs) * block_size] pool rows
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero every row of `blocks` in every layer, K and V.

        For a sequence stopped for non-finite values: its blocks go back to the free list
        holding finite values, so no later owner of them can read its NaN.
        """
        if not blocks:
            return
        ids = torch.tensor(blocks, dtype=torch.int64, device=self.k.device)
        rows = (ids[:, None] * self.block_size
                + torch.arange(self.block_size, device=self.k.device)).reshape(-1)
        self.k.index_fill_(1, rows, 0)
        self.v.index_fill_(1, rows, 0)
