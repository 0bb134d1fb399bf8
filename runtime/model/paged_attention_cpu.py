"""The CPU paged-attention op: `csrc/paged_attention.cpp`, built at first use.

`load()` compiles the C++ sources (`SOURCES`) with `kernels.native.load_library` into
`.cache/torch_extensions/` of the repository and registers `torch.ops.loragate.paged_attention`;
later processes reuse the build. When the build cannot happen (no compiler, no ninja, a
read-only tree) it logs why, once, and answers None: callers keep the gather path
(`attention.py`).
`supports(...)` says whether a model's shapes fit the kernel.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from kernels import native

# The runtime's C++ sources, built as one library (each registers its ops in `loragate`).
_CSRC = Path(__file__).with_name("csrc")
SOURCES = [_CSRC / "paged_attention.cpp"]
_BUILD_NAME = "loragate_paged_attention"  # the build folder: <name>_<CPU variant>
# Mirrors the kernel's own checks (paged_attention.cpp): beyond these, the gather path.
_LANES, _MAX_GROUP, _MAX_HEAD_DIM = 16, 16, 256

PagedAttentionOp = Callable[..., None]


def supports(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    return (dtype == torch.float32 and num_kv_heads > 0 and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= _MAX_GROUP and head_dim % _LANES == 0
            and head_dim <= _MAX_HEAD_DIM)


_load_lock = threading.Lock()


@functools.cache
def load() -> PagedAttentionOp | None:
    """The op, built on the first call of the process; None (logged once, with why) when it
    cannot be built or loaded. Engines built on two threads at once build it once."""
    with _load_lock:
        if not native.load_library(_BUILD_NAME, SOURCES, fallback="using the gather path"):
            return None
        op: PagedAttentionOp = torch.ops.loragate.paged_attention
        return op


def paged_attention_cpu(
    op: PagedAttentionOp,
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim] float32
    k_pool: torch.Tensor,  # [pool_rows, num_kv_heads, head_dim] float32 (this layer)
    v_pool: torch.Tensor,  # [pool_rows, num_kv_heads, head_dim] float32
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    rows: torch.Tensor,  # [num_queries] int32 rows of q (and of out) to attend for
    seqs: torch.Tensor,  # [num_queries] int32 row of block_tables of each query
    lens: torch.Tensor,  # [num_queries] int32 context each query sees (itself included)
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim] float32, written at `rows`
    block_size: int,
    scale: float,
) -> None:
    op(q.contiguous(), k_pool, v_pool, block_tables, rows, seqs, lens, out, block_size, scale)
