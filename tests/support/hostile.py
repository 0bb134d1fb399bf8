"""Adapters crafted past upload validation, placed in a content-addressed store.

Upload refuses hostile values now; these helpers stand for what reaches a runtime anyway
(an artifact written before the check, a store written by hand): PEFT-named tensors for the
runtime's base model, the artifact under `sha256/<aa>/<hex>` as adapters/storage.py lays it
out, and the runtime's reference to it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save

from runtime.model.weights import ModelArgs
from runtime.types import AdapterRef

HOSTILE_B = 3e38  # finite in float32, and any product with it overflows


def lora_tensors(args: ModelArgs, rank: int, modules: tuple[str, ...], seed: int = 0,
                 b_value: float | None = None) -> dict[str, torch.Tensor]:
    """PEFT's tensor names and shapes for `modules` of every layer (q/k/v/o only).

    `b_value`: every lora_B entry set to it; else small random values that still change
    the greedy answer.
    """
    gen = torch.Generator().manual_seed(seed)
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    shapes = {"q_proj": (q, args.hidden_size), "k_proj": (kv, args.hidden_size),
              "v_proj": (kv, args.hidden_size), "o_proj": (args.hidden_size, q)}
    tensors = {}
    for layer in range(args.num_layers):
        for module in modules:
            out_f, in_f = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.1
            b = torch.randn(out_f, rank, generator=gen) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = b.fill_(b_value) if b_value is not None else b
    return tensors


def publish(store_root: Path, data: bytes) -> tuple[str, str]:
    """Write `data` at its content address under `store_root`; (sha256, file URI)."""
    sha256 = hashlib.sha256(data).hexdigest()
    path = store_root.resolve() / "sha256" / sha256[:2] / sha256
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return sha256, path.as_uri()


def crafted_ref(store_root: Path, args: ModelArgs, name: str, *, rank: int = 4,
                alpha: float = 8.0, modules: tuple[str, ...] = ("q_proj", "v_proj"),
                seed: int = 0, b_value: float | None = None) -> AdapterRef:
    """An adapter written into the store and the runtime's reference to it."""
    data = save(lora_tensors(args, rank, modules, seed, b_value))
    sha256, uri = publish(store_root, data)
    return AdapterRef.for_version(sha256, uri, rank, alpha, modules, name=name)
