"""The built-in model: same bytes every time, and a real Llama for transformers and PEFT."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from runtime.model.builtin import ensure_builtin_model


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.unit
def test_builtin_model_is_byte_deterministic(tmp_path: Path) -> None:
    a = ensure_builtin_model(tmp_path / "a")
    b = ensure_builtin_model(tmp_path / "b")
    digests = _digests(a)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(digests)
    assert digests == _digests(b)
    # Nothing but the target directory is left behind (the temp dir was renamed).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.unit
def test_builtin_model_is_reused_and_refuses_foreign_dirs(tmp_path: Path) -> None:
    target = ensure_builtin_model(tmp_path / "m")
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert ensure_builtin_model(target) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(FileExistsError):
        ensure_builtin_model(foreign)


@pytest.mark.unit
def test_builtin_model_loads_with_transformers_and_peft(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    directory = ensure_builtin_model(tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    assert 1000 <= len(tok) <= 2000 and len(tok) == config["vocab_size"]
    ids = tok("The harbor town woke slowly.").input_ids
    assert ids[0] == tok.bos_token_id == config["bos_token_id"]
    assert tok.decode(ids, skip_special_tokens=True) == "The harbor town woke slowly."
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "hi" in chat and chat.endswith("assistant:")

    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    new = out[0, len(ids):].tolist()
    assert len(new) == 12 and len(set(new)) > 3  # greedy text is not one repeated token

    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"])
    )
    assert lora.get_nb_trainable_parameters()[0] > 0
