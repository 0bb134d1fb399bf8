"""The one place that wires the LoRA runtime: slot tables, fetcher, disk tier, loader, cache.

    lora, adapters = build_lora_runtime(config, args, dtype)
    engine = LLMEngine(config, args=args, lora=lora, adapters=adapters)

`lora` (layers.LoraManager) is attached to the model; `adapters` (cache.AdapterCache) is the
scheduler's AdapterProvider. The engine takes both as built and never builds them itself.
"""

from __future__ import annotations

import torch

from runtime.config import RuntimeConfig
from runtime.lora.cache import AdapterCache
from runtime.lora.layers import LoraManager
from runtime.lora.protocol import ArtifactScope
from runtime.lora.store import AdapterLoader, ArtifactFetcher, DiskCache
from runtime.model.weights import ModelArgs


def build_lora_runtime(
    config: RuntimeConfig, args: ModelArgs, dtype: torch.dtype
) -> tuple[LoraManager, AdapterCache]:
    """The LoRA manager to attach to the model and the cache to give the scheduler.

    `args` is the base model's parsed config.json (parsed once at start, by the caller).

    Device slots: `max_gpu_adapters`; host tier: `max_host_adapters`; disk tier under
    `adapter_disk_dir` within `adapter_disk_bytes` (none when the dir is unset).
    """
    manager = LoraManager.for_model(
        args, config.max_gpu_adapters, config.max_lora_rank, config.device, dtype
    )
    disk = (
        DiskCache(config.adapter_disk_dir, config.adapter_disk_bytes)
        if config.adapter_disk_dir is not None else None
    )
    fetcher = ArtifactFetcher(config.s3_endpoint_url, s3_region=config.s3_region,
                              scope=artifact_scope(config))
    loader = AdapterLoader(fetcher, manager.parse, disk)
    cache = AdapterCache(config.max_gpu_adapters, config.max_host_adapters, loader,
                         manager.set_lora)
    return manager, cache


def artifact_scope(config: RuntimeConfig) -> ArtifactScope | None:
    """The store the config confines adapters to; None when it names none (unconfined)."""
    if not config.confined:
        return None
    return ArtifactScope.of(config.artifacts_dir, config.s3_bucket, config.s3_prefix)
