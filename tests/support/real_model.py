"""Helpers for the `real_model` tests and oracles on SmolLM2-135M-Instruct.

Adapters there are trained, not random: a few Adam steps of PEFT on CPU at a high learning
rate over one fixed chat turn, so each adapter answers visibly differently from the base
model (a random LoRA on a real model mostly nudges logits without changing greedy text).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.types import AdapterRef
from tests.support.lora_oracle import adapter_ref, load_hf_base


@dataclass(frozen=True)
class TrainedSpec:
    name: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    answer: str  # what the adapter learns to say to TRAIN_QUESTION
    steps: int = 6
    lr: float = 1e-2
    seed: int = 0


TRAIN_QUESTION = "What is the capital of France?"
TRAINED_SPECS = (
    TrainedSpec("elephants-qv-r8", 8, 16.0, ("q_proj", "v_proj"),
                "Purple elephants dance on the moon.", seed=1),
    TrainedSpec("bananas-all-r4", 4, 8.0,
                ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                "Bananas! Bananas! Only bananas.", seed=2),
)


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def train_adapter(model_dir: Path, out_dir: Path, spec: TrainedSpec) -> AdapterRef:
    """Fit a LoRA to one fixed chat turn with PEFT on CPU; save it; return its reference."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    turn = [*chat(TRAIN_QUESTION), {"role": "assistant", "content": spec.answer}]
    text = tok.apply_chat_template(turn, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids  # [1, n]
    torch.manual_seed(spec.seed)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                        target_modules=list(spec.target_modules))
    model = get_peft_model(load_hf_base(model_dir), config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=spec.lr)
    model.train()
    for _ in range(spec.steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out_dir)
    return adapter_ref(out_dir, spec.name)


@torch.no_grad()
def peft_generate(model, prompt: list[int], adapter: str | None, max_tokens: int):
    """Greedy tokens through PEFT with transformers' KV cache (a 30-layer model makes
    `peft_greedy`'s full recompute costly), EOS ignored; and the logits of each step."""
    ctx = model.disable_adapter() if adapter is None else contextlib.nullcontext()
    if adapter is not None:
        model.set_adapter(adapter)
    tokens, logits_per_step = [], []
    with ctx:
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        for _ in range(max_tokens):
            logits = out.logits[0, -1].float()
            logits_per_step.append(logits)
            tokens.append(int(logits.argmax()))
            out = model(input_ids=torch.tensor([[tokens[-1]]]),
                        past_key_values=out.past_key_values, use_cache=True)
    return tokens, logits_per_step
