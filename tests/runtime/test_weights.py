"""Checkpoint reading: configs and files the runtime refuses, with a reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from runtime.model.weights import ModelArgs, load_weights
from tests.support.hf_models import builtin_model_dir


@pytest.fixture(scope="module")
def builtin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builtin_model_dir(tmp_path_factory.mktemp("weights") / "builtin")


def copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.unit
def test_config_reading(builtin: Path) -> None:
    args = ModelArgs.from_model_dir(builtin)
    assert (args.num_heads, args.num_kv_heads, args.head_dim) == (4, 2, 32)
    assert args.eos_token_ids == (2,) and not args.qkv_bias and args.rope_scaling is None
    cfg = json.loads((builtin / "config.json").read_text())
    v5 = cfg | {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}}
    v5.pop("rope_theta")
    args = ModelArgs.from_config(v5)
    assert args.rope_theta == 5e5 and args.rope_scaling == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.unit
@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architecture"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_are_refused(builtin: Path, changes: dict, message: str) -> None:
    cfg = json.loads((builtin / "config.json").read_text()) | changes
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_config(cfg)


@pytest.mark.unit
def test_pickle_checkpoints_are_refused(builtin: Path, tmp_path: Path) -> None:
    model = copy_with_config(builtin, tmp_path / "m")
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_weights(model, ModelArgs.from_model_dir(model), torch.float32, "cpu")


@pytest.mark.unit
def test_shard_names_cannot_leave_the_model_dir(builtin: Path, tmp_path: Path) -> None:
    model = copy_with_config(builtin, tmp_path / "m")
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="plain file names"):
        load_weights(model, ModelArgs.from_model_dir(model), torch.float32, "cpu")


@pytest.mark.unit
def test_shape_mismatch_with_the_config_is_refused(builtin: Path, tmp_path: Path) -> None:
    model = copy_with_config(builtin, tmp_path / "m", intermediate_size=300)
    with pytest.raises(ValueError, match="shape"):
        load_weights(model, ModelArgs.from_model_dir(model), torch.float32, "cpu")
