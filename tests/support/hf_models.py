"""Helpers for the engine tests: tiny random HF models saved to tmp dirs, and HF oracles."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from runtime.model.builtin import ensure_builtin_model


def save_random_model(
    out: Path, kind: str = "llama", seed: int = 0, max_shard_size: str = "2GB", **overrides
) -> Path:
    """A small transformers model with random weights (norms and biases too), saved to `out`.

    The tokenizer files of the built-in model are copied next to it so the engine can load it.
    """
    import transformers

    common = dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    common.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    builtin = builtin_model_dir(out.parent / "_builtin_for_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((builtin / name).read_bytes())
    return out


@contextlib.contextmanager
def torch_threads(n: int):
    """Intra-op threads for a block: on a shared 2-core box, 2 threads spin against other
    processes and small ops get 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def builtin_model_dir(path: Path) -> Path:
    return ensure_builtin_model(path)


def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
