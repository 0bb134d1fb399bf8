"""The decoder layer's fused float32 CPU ops: `csrc/decode_ops.cpp`, built at first use.

`load()` builds the C++ source like the paged-attention kernel (paged_attention_cpu.py: same
cache folder, one build per CPU kind) but as a library of its own, compiled with
-ffp-contract=off: its rotary and residual add must round like the torch ops they replace,
which an FMA would not. False (logged once) when it cannot be built: the model keeps the torch
ops. `usable(...)` says whether a forward can take these ops at all.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path

import torch

from runtime.model import paged_attention_cpu

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "decode_ops.cpp"
_ROOT = Path(__file__).resolve().parents[2]
_load_lock = threading.Lock()


def usable(device: torch.device, dtype: torch.dtype, attn_dtype: torch.dtype) -> bool:
    """Float32 weights, activations and KV on the CPU, with the library built."""
    return (device.type == "cpu" and dtype == torch.float32 and attn_dtype == torch.float32
            and load())


@functools.cache
def load() -> bool:
    with _load_lock:
        try:
            from torch.utils import cpp_extension

            suffix, flags = paged_attention_cpu._flags()
            name = f"loragate_decode_ops_{suffix}"
            build_dir: str | None = None
            if (_ROOT / "pyproject.toml").exists():
                path = _ROOT / ".cache" / "torch_extensions" / name
                path.mkdir(parents=True, exist_ok=True)
                build_dir = str(path)
            with paged_attention_cpu._ninja_on_path():
                cpp_extension.load(
                    name=name, sources=[str(_SOURCE)], extra_cflags=[*flags, "-ffp-contract=off"],
                    build_directory=build_dir, is_python_module=False, verbose=False,
                )
            torch.ops.loragate_decode.add_rms_norm  # noqa: B018 (resolves the op or raises)
            return True
        except Exception as exc:  # no build means the torch ops, never a crash
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            _log.warning("fused CPU decode ops unavailable, using torch ops: %s", why)
            return False


def add_rms_norm(
    h: torch.Tensor,  # [num_tokens, hidden] float32, the residual stream: += delta in place
    delta: torch.Tensor | None,  # [num_tokens, hidden] float32
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:  # [num_tokens, hidden]: rms_norm(h + delta) * weight
    return torch.ops.loragate_decode.add_rms_norm(h, delta, weight, eps)


def rope_write_kv(
    qkv: torch.Tensor,  # [num_tokens, (heads + 2 * kv_heads) * head_dim] float32
    cos: torch.Tensor,  # [num_tokens, 1, head_dim]
    signed_sin: torch.Tensor,  # [num_tokens, 1, head_dim] (llama.apply_rotary)
    k_pool: torch.Tensor,  # [pool_rows, kv_heads, head_dim] this layer's, rows written
    v_pool: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64 pool rows of the new tokens
    heads: int,
    kv_heads: int,
) -> torch.Tensor:  # [num_tokens, heads, head_dim]: q after rotary
    return torch.ops.loragate_decode.rope_write_kv(qkv, cos, signed_sin, k_pool, v_pool,
                                                   slot_mapping, heads, kv_heads)


def silu_mul(
    gate_up: torch.Tensor,  # [num_tokens, 2 * intermediate] float32: gate, then up
) -> torch.Tensor:  # [num_tokens, intermediate]: silu(gate) * up
    return torch.ops.loragate_decode.silu_mul(gate_up)
