"""The decoder layer's fused CPU ops: `csrc/decode_ops.cpp`, built at first use.

Activations float32, or bfloat16 (`--dtype bfloat16`: each op computes in float32 and rounds
once to bfloat16, as torch's bf16 kernels do); attention and the KV cache float32 either way.

`load()` builds the C++ source with `kernels.native.load_library` (the checkout's
.cache/torch_extensions/, one build per CPU kind) as a library of its own, compiled with
-ffp-contract=off: its rotary and residual add must round like the torch ops they replace,
which an FMA would not. False (logged once) when it cannot be built: the model keeps the torch
ops. `usable(...)` says whether a forward can take these ops at all.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from kernels import native

_SOURCE = Path(__file__).with_name("csrc") / "decode_ops.cpp"
_BUILD_NAME = "loragate_decode_ops"


def usable(device: torch.device, dtype: torch.dtype, attn_dtype: torch.dtype) -> bool:
    """On the CPU, float32 or bfloat16 weights and activations, float32 attention and KV,
    with the library built."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and attn_dtype == torch.float32 and load())


@functools.cache
def load() -> bool:
    """Whether the library is built and loaded (built on the first call of the process)."""
    return native.load_library(_BUILD_NAME, [_SOURCE], fallback="using torch ops",
                               extra_cflags=["-ffp-contract=off"])


def add_rms_norm(
    h: torch.Tensor,  # [num_tokens, hidden] float32 / bf16, the residual stream: += delta
    delta: torch.Tensor | None,  # [num_tokens, hidden] of h's dtype
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:  # [num_tokens, hidden]: rms_norm(h + delta) * weight
    return torch.ops.loragate_decode.add_rms_norm(h, delta, weight, eps)


def rope_write_kv(
    qkv: torch.Tensor,  # [num_tokens, (heads + 2 * kv_heads) * head_dim] float32 / bf16
    cos: torch.Tensor,  # [num_tokens, 1, head_dim]
    signed_sin: torch.Tensor,  # [num_tokens, 1, head_dim] (llama.apply_rotary)
    k_pool: torch.Tensor,  # [pool_rows, kv_heads, head_dim] float32, this layer's
    v_pool: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64 pool rows of the new tokens
    heads: int,
    kv_heads: int,
) -> torch.Tensor:  # [num_tokens, heads, head_dim] float32: q after rotary
    return torch.ops.loragate_decode.rope_write_kv(qkv, cos, signed_sin, k_pool, v_pool,
                                                   slot_mapping, heads, kv_heads)


def silu_mul(
    gate_up: torch.Tensor,  # [num_tokens, 2 * intermediate] float32 / bf16: gate, then up
) -> torch.Tensor:  # [num_tokens, intermediate]: silu(gate) * up
    return torch.ops.loragate_decode.silu_mul(gate_up)
