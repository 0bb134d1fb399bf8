"""Real PEFT adapters, saved by `save_pretrained` on the built-in model, pass validation and
are listed with the facts PEFT wrote; a tampered one is refused."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from adapters.base_model import BaseModelSpec
from adapters.catalog import Catalog
from adapters.db import create_engine, create_sessionmaker, upgrade_database
from adapters.errors import ValidationFailed
from adapters.storage import LocalStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def builtin_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from runtime.model.builtin import ensure_builtin_model

    return ensure_builtin_model(tmp_path_factory.mktemp("model") / "builtin")


def _save_peft(model_dir: Path, out: Path, **lora_kwargs) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    with torch.no_grad():  # PEFT starts lora_B at zero; make the weights non-trivial
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
async def builtin_catalog(builtin_model: Path, tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    upgrade_database(url)
    engine = create_engine(url)
    spec = BaseModelSpec.from_config_file(builtin_model / "config.json")
    cat = Catalog(create_sessionmaker(engine), LocalStore(tmp_path / "art"), spec)
    await cat.create_tenant("acme")
    yield cat
    await engine.dispose()


@pytest.mark.parametrize(
    ("lora_kwargs", "modules"),
    [
        ({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}, ["q_proj", "v_proj"]),
        (
            {"r": 4, "lora_alpha": 4, "target_modules": "all-linear", "use_rslora": True},
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        (
            {"r": 2, "lora_alpha": 8, "target_modules": r".*\.mlp\.(up|down)_proj"},
            ["up_proj", "down_proj"],
        ),
    ],
)
async def test_peft_adapter_uploads_with_its_facts(
    builtin_model: Path, builtin_catalog: Catalog, tmp_path: Path, lora_kwargs, modules
) -> None:
    out = _save_peft(builtin_model, tmp_path / "peft", **lora_kwargs)
    config_path = out / "adapter_config.json"
    model_path = out / "adapter_model.safetensors"
    view = await builtin_catalog.upload_version("acme", "support", config_path, model_path)
    assert view.rank == lora_kwargs["r"]
    assert view.alpha == float(lora_kwargs["lora_alpha"])
    assert list(view.target_modules) == modules
    assert view.use_rslora == lora_kwargs.get("use_rslora", False)
    assert view.size_bytes == model_path.stat().st_size
    assert view.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert json.loads(config_path.read_text())["peft_type"] == "LORA"


async def test_peft_adapter_for_another_model_shape_is_refused(
    builtin_model: Path, tmp_path: Path
) -> None:
    out = _save_peft(builtin_model, tmp_path / "peft", r=4, target_modules=["q_proj"])
    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    upgrade_database(url)
    engine = create_engine(url)
    spec = BaseModelSpec.from_config_file(builtin_model / "config.json")
    wider = replace(spec, hidden_size=spec.hidden_size * 2)
    cat = Catalog(create_sessionmaker(engine), LocalStore(tmp_path / "art"), wider)
    try:
        await cat.create_tenant("acme")
        with pytest.raises(ValidationFailed, match="shape"):
            await cat.upload_version(
                "acme", "a", out / "adapter_config.json", out / "adapter_model.safetensors"
            )
    finally:
        await engine.dispose()
