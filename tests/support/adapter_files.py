"""Crafting adapter files for the catalog tests: good LoRA adapters and broken variants.

The safetensors writer here is independent of adapters/safetensors_header.py (it follows the
published format: u64 LE header length, JSON header, contiguous data), so the parser is
tested against files it did not produce.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from adapters.base_model import BaseModelSpec
from adapters.catalog import Catalog
from adapters.models import Adapter, AdapterVersion
from adapters.storage import LocalStore
from adapters.views import VersionView

# A tiny Llama: q out 64, k/v out 32 (GQA 4:2), intermediate 96, two layers.
SPEC = BaseModelSpec(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    model_type="llama",
)
NP_DTYPES = {"F16": np.float16, "F32": np.float32}


def lora_config(rank: int = 4, modules: Any = ("q_proj", "v_proj"), **extra: Any) -> dict:
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(modules) if not isinstance(modules, str) else modules,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    config.update(extra)
    return config


def lora_tensors(
    rank: int = 4,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
    layers: int = 2,
    spec: BaseModelSpec = SPEC,
    dtype: str = "F32",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """PEFT-named lora_A [r, in] and lora_B [out, r] for each layer and module."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for layer in range(layers):
        for module in modules:
            group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            in_f, out_f = spec.module_features(module)
            base = f"base_model.model.model.layers.{layer}.{group}.{module}"
            out[f"{base}.lora_A.weight"] = rng.normal(size=(rank, in_f)).astype(NP_DTYPES[dtype])
            out[f"{base}.lora_B.weight"] = rng.normal(size=(out_f, rank)).astype(NP_DTYPES[dtype])
    return out


def encode_safetensors(tensors: dict[str, np.ndarray], metadata: dict | None = None) -> bytes:
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    names = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.uint16): "BF16"}
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": names[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    if metadata is not None:
        header["__metadata__"] = metadata
    return raw_safetensors(json.dumps(header).encode(), b"".join(blobs))


def raw_safetensors(header: bytes, data: bytes, declared_length: int | None = None) -> bytes:
    length = len(header) if declared_length is None else declared_length
    return struct.pack("<Q", length) + header + data


def write_adapter(
    directory: Path,
    config: dict | bytes | None = None,
    model: bytes | dict[str, np.ndarray] | None = None,
) -> tuple[Path, Path]:
    """adapter_config.json and adapter_model.safetensors under directory (good by default)."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "adapter_config.json"
    model_path = directory / "adapter_model.safetensors"
    if config is None:
        config = lora_config()
    config_path.write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    if model is None:
        model = lora_tensors()
    model_path.write_bytes(model if isinstance(model, bytes) else encode_safetensors(model))
    return config_path, model_path


async def count_rows(cat: Catalog) -> tuple[int, int]:
    """(adapters, adapter_versions) rows over all tenants."""
    async with cat._sessions() as session:
        adapters = await session.scalar(select(func.count()).select_from(Adapter))
        versions = await session.scalar(select(func.count()).select_from(AdapterVersion))
    return int(adapters or 0), int(versions or 0)


def stored_objects(store: LocalStore) -> list[Path]:
    """Every file under the store root, temp files included."""
    if not store.root.exists():
        return []
    return [p for p in store.root.rglob("*") if p.is_file()]


async def upload(
    cat: Catalog, where: Path, tenant: str, adapter: str, seed: int, activate: bool | None = None
) -> VersionView:
    """A good adapter whose weights are drawn from `seed`: equal seeds give equal bytes."""
    paths = write_adapter(where / f"{tenant}-{adapter}-{seed}", model=lora_tensors(seed=seed))
    return await cat.upload_version(tenant, adapter, *paths, activate=activate)


def stored_names(store: LocalStore) -> set[str]:
    return {p.name for p in stored_objects(store)}
