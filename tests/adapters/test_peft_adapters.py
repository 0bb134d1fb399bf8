"""Real PEFT adapters, saved by `save_pretrained` on the built-in model, pass validation and
are listed with the facts PEFT wrote; a tampered one is refused. Real values pass the value
bounds: every PEFT init, and adapters trained hard (a high learning rate, hundreds of steps)."""

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
from adapters.weight_bounds import MAX_DELTA_ABS

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


@pytest.mark.parametrize("init", [True, False, "gaussian"])
async def test_every_peft_init_passes_the_value_bounds(
    builtin_model: Path, builtin_catalog: Catalog, tmp_path: Path, init: bool | str
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(builtin_model)
    config = LoraConfig(r=1, lora_alpha=64, target_modules="all-linear",  # scale 64
                        init_lora_weights=init, task_type="CAUSAL_LM")
    out = tmp_path / "peft"
    get_peft_model(model, config).save_pretrained(out)
    view = await builtin_catalog.upload_version(
        "acme", "init", out / "adapter_config.json", out / "adapter_model.safetensors")
    assert view.rank == 1 and view.alpha == 64.0


def _train_peft(model_dir: Path, out: Path, steps: int, lr: float, **lora_kwargs) -> float:
    """A LoRA trained with AdamW on windows of the built-in model's own corpus (the text its
    tokenizer was trained on); returns the adapter's delta bound."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import runtime.model.builtin

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = Path(runtime.model.builtin.__file__).with_name("builtin_corpus.txt").read_text("utf-8")
    ids = torch.tensor(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"])
    config = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", **lora_kwargs)
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 64, (4,)).tolist()
        batch = torch.stack([ids[s : s + 64] for s in starts])  # [4, 64]
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(out)
    r, alpha = lora_kwargs["r"], lora_kwargs["lora_alpha"]
    scale = alpha / r**0.5 if lora_kwargs.get("use_rslora") else alpha / r
    bound = 0.0
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            bound = max(bound, scale * r * a.abs().max().item() * b.abs().max().item())
    return bound


@pytest.mark.parametrize(
    ("lr", "lora_kwargs"),
    [
        (1e-2, {"r": 8, "lora_alpha": 16}),  # hot but sane: it learns the corpus
        (3e-2, {"r": 16, "lora_alpha": 64, "use_rslora": True}),  # diverges: bound ~430
    ],
)
async def test_an_adapter_trained_hard_passes_the_value_bounds(
    builtin_model: Path, builtin_catalog: Catalog, tmp_path: Path, lr: float, lora_kwargs
) -> None:
    out = tmp_path / "trained"
    bound = _train_peft(builtin_model, out, steps=300, lr=lr, **lora_kwargs)
    assert 1.0 < bound < MAX_DELTA_ABS  # far from PEFT's init (bound 0), under the limit
    view = await builtin_catalog.upload_version(
        "acme", "trained", out / "adapter_config.json", out / "adapter_model.safetensors")
    assert view.rank == lora_kwargs["r"]


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
