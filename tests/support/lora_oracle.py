"""Helpers for the LoRA tests: real PEFT adapters of the built-in model, and PEFT as oracle."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.types import AdapterRef

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    seed: int = 0


# Ranks 4, 8, 16, 32; one attention-only, one all-linear, one rsLoRA, one on the MLP only.
SPECS = (
    AdapterSpec("attn-r4", 4, 8.0, ATTENTION, seed=1),
    AdapterSpec("all-r8", 8, 16.0, ALL_LINEAR, seed=2),
    AdapterSpec("rslora-r16", 16, 8.0, ("q_proj", "v_proj", "down_proj"), use_rslora=True, seed=3),
    AdapterSpec("mlp-r32", 32, 16.0, ("gate_proj", "up_proj", "down_proj"), seed=4),
    AdapterSpec("qv-r8", 8, 32.0, ("q_proj", "v_proj"), seed=5),
    AdapterSpec("ko-r4", 4, 4.0, ("k_proj", "o_proj", "up_proj"), seed=6),
)


def load_hf_base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def make_peft_adapter(model_dir: Path, out_dir: Path, spec: AdapterSpec) -> AdapterRef:
    """Save a PEFT adapter with random (non-zero) A and B; return the runtime's reference."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(spec.seed)
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
        lora_dropout=0.0, use_rslora=spec.use_rslora, init_lora_weights=False,
    )
    peft_model = get_peft_model(load_hf_base(model_dir), config)
    with torch.no_grad():  # PEFT's non-default init is small; make each adapter matter
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(out_dir)
    return adapter_ref(out_dir, spec.name)


def adapter_ref(adapter_dir: Path, name: str) -> AdapterRef:
    model_file = adapter_dir / "adapter_model.safetensors"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    return AdapterRef.for_version(
        sha256=hashlib.sha256(model_file.read_bytes()).hexdigest(),
        uri=model_file.resolve().as_uri(),
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        target_modules=tuple(sorted(cfg["target_modules"])),
        use_rslora=bool(cfg.get("use_rslora", False)),
        name=name,
    )


def load_peft_multi(model_dir: Path, adapter_dirs: dict[str, Path]):
    """One PeftModel holding every adapter under its name (for set_adapter / adapter_names)."""
    from peft import PeftModel

    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(load_hf_base(model_dir), adapter_dirs[names[0]],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    return model.eval()


@torch.no_grad()
def peft_greedy(model, prompt: list[int], adapter: str | None, max_tokens: int):
    """Greedy tokens and the logits that chose each one, by full recompute (no cache)."""
    ids = list(prompt)
    logits_per_step = []
    for _ in range(max_tokens):
        inp = torch.tensor([ids])
        if adapter is None:
            with model.disable_adapter():
                logits = model(input_ids=inp).logits[0, -1]
        else:
            model.set_adapter(adapter)
            logits = model(input_ids=inp).logits[0, -1]
        logits_per_step.append(logits.float())
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], logits_per_step
