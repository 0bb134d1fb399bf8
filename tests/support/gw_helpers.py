"""Helpers of the gateway tests (a module name of its own, so no other test area shadows it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient

from gateway.settings import Settings

ADMIN_TOKEN = "admin-test-token-9f1c2e7a4b"


def make_peft_adapter(base_model_dir: Path, out: Path, rank: int, alpha: int,
                      target_modules: list[str], seed: int = 0) -> Path:
    """A LoRA adapter written by peft's own save_pretrained on the built-in model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out)
    return out


def make_settings(data_dir: Path, base_model_dir: Path, **overrides: Any) -> Settings:
    overrides.setdefault("admin_token", ADMIN_TOKEN)
    return Settings.from_env(environ={}, data_dir=data_dir, base_model_dir=base_model_dir,
                             **overrides)


def admin(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def adapter_files(directory: Path) -> dict[str, tuple[str, bytes, str]]:
    return {
        "adapter_config": ("adapter_config.json",
                           (directory / "adapter_config.json").read_bytes(), "application/json"),
        "adapter_model": ("adapter_model.safetensors",
                          (directory / "adapter_model.safetensors").read_bytes(),
                          "application/octet-stream"),
    }


async def create_tenant(client: AsyncTestClient[Any], name: str) -> str:
    """Create a tenant and one key; the key's plaintext."""
    response = await client.post("/admin/tenants", json={"name": name}, headers=admin())
    assert response.status_code == 201, response.text
    response = await client.post(f"/admin/tenants/{name}/keys", json={"name": "ci"},
                                 headers=admin())
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


async def upload(client: AsyncTestClient[Any], tenant: str, adapter: str, directory: Path,
                 **params: str) -> Any:
    return await client.post(
        f"/admin/tenants/{tenant}/adapters/{adapter}/versions",
        files=adapter_files(directory), params=params, headers=admin(),
    )


def read_adapter_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "adapter_config.json").read_text())
