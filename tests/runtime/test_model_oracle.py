"""Oracle: our paged forward against transformers on the same weights, fp32, logits within 1e-4,
with the projections through F.linear and through oneDNN over reordered weights (linear.py),
and the serving default: oneDNN with the norms, rotary and KV write fused (fused_cpu.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.model import fused_cpu, gemm_cpu
from runtime.model.attention import build_metadata
from runtime.model.kv_cache import KVCache
from runtime.model.linear import onednn_available
from runtime.model.llama import LlamaModel
from tests.support.hf_models import builtin_model_dir, hf_model, save_random_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-4
Run = tuple[torch.Tensor, list[torch.Tensor], list[int]]  # prefill logits, step logits, tokens
PROMPT_LEN = 37
DECODE_STEPS = 10
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    "builtin": None,
    "llama-gqa": ("llama", {}),
    "qwen2-qkv-bias": ("qwen2", {}),
    "llama3-rope-scaling": ("llama", {"rope_scaling": LLAMA3_ROPE, "num_key_value_heads": 1}),
    "linear-rope-tied-embeddings": (
        "llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                  "tie_word_embeddings": True, "num_key_value_heads": 4}),
    "mistral-sharded": ("mistral", {"sliding_window": None, "head_dim": 32}),
}


def _model_dir(tmp_path: Path, case: str) -> Path:
    spec = CASES[case]
    if spec is None:
        return builtin_model_dir(tmp_path / "builtin")
    kind, overrides = spec
    shard = "60KB" if case == "mistral-sharded" else "2GB"
    return save_random_model(tmp_path / case, kind, seed=len(case), max_shard_size=shard,
                             **overrides)


@torch.no_grad()
def _hf_run(model_dir: Path, prompt: list[int]) -> Run:
    model = hf_model(model_dir)
    prefill = model(torch.tensor([prompt])).logits[0]
    ids, steps, tokens = list(prompt), [], []
    token = int(prefill[-1].argmax())
    for _ in range(DECODE_STEPS):
        ids.append(token)
        tokens.append(token)
        logits = model(torch.tensor([ids])).logits[0, -1]
        steps.append(logits)
        token = int(logits.argmax())
    return prefill, steps, tokens


def _our_run(model_dir: Path, prompt: list[int], path: tuple[str, bool]) -> Run:
    gemm, fused_ops = path
    model = LlamaModel.load(model_dir, "cpu", torch.float32, gemm=gemm, fused_ops=fused_ops)
    kv = KVCache(model.args, num_blocks=12, block_size=16, dtype=torch.float32, device="cpu")
    table = [7, 2, 11, 5]  # scattered on purpose: the block table must be honoured
    # Prefill in two chunks, the second attending over the cached first.
    chunks, done = [], 0
    for n in (20, PROMPT_LEN - 20):
        meta = build_metadata([(table, done, n)], 16, "cpu")
        hidden = model.forward(torch.tensor(prompt[done:done + n]),
                               torch.arange(done, done + n), meta, kv)
        chunks.append(model.compute_logits(hidden))
        done += n
    prefill = torch.cat(chunks)
    steps, tokens = [], []
    token = int(prefill[-1].argmax())
    for _ in range(DECODE_STEPS):
        tokens.append(token)
        meta = build_metadata([(table, done, 1)], 16, "cpu")
        hidden = model.forward(torch.tensor([token]), torch.tensor([done]), meta, kv)
        done += 1
        logits = model.compute_logits(hidden)[0]
        steps.append(logits)
        token = int(logits.argmax())
    return prefill, steps, tokens


_NO_ONEDNN = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN linear")
_NO_FUSED = pytest.mark.skipif(not fused_cpu.load(), reason="the fused CPU ops did not build")
_NO_NATIVE = pytest.mark.skipif(not gemm_cpu.load(), reason="the CPU GEMM did not build")
# (Linear backend, fused_ops)
PATHS = [pytest.param(("plain", False), id="f_linear"),
         pytest.param(("onednn", False), id="onednn", marks=_NO_ONEDNN),
         pytest.param(("onednn", True), id="onednn-fused", marks=[_NO_ONEDNN, _NO_FUSED]),
         pytest.param(("native", True), id="native-fused", marks=[_NO_NATIVE, _NO_FUSED])]


@pytest.mark.unit
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_tokens_match_transformers(
    tmp_path: Path, case: str, path: tuple[str, bool],
) -> None:
    model_dir = _model_dir(tmp_path, case)
    if case == "mistral-sharded":
        assert (model_dir / "model.safetensors.index.json").is_file()
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, 1000, (PROMPT_LEN,), generator=gen).tolist()
    ref_prefill, ref_steps, ref_tokens = _hf_run(model_dir, prompt)
    prefill, steps, tokens = _our_run(model_dir, prompt, path)
    assert prefill.shape == ref_prefill.shape
    torch.testing.assert_close(prefill, ref_prefill, atol=TOL, rtol=0)
    assert tokens == ref_tokens
    for ours, ref in zip(steps, ref_steps, strict=True):
        torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)


class _RecordingLora:
    """A LoRA hook that records its calls and adds 1 to every qkv output."""

    def __init__(self) -> None:
        self.active = True
        self.calls: list[tuple[int, str, tuple, tuple]] = []

    def apply(self, layer_idx: int, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.calls.append((layer_idx, name, tuple(x.shape), tuple(y.shape)))
        if name == "qkv_proj":
            y.add_(1.0)


@pytest.mark.unit
def test_lora_hook_sees_each_projection_and_edits_in_place(tmp_path: Path) -> None:
    model = LlamaModel.load(builtin_model_dir(tmp_path / "m"), "cpu", torch.float32)
    a = model.args
    kv = KVCache(a, num_blocks=2, block_size=16, dtype=torch.float32, device="cpu")
    meta = build_metadata([([0], 0, 5)], 16, "cpu")
    ids, pos = torch.arange(3, 8), torch.arange(5)
    base = model.compute_logits(model.forward(ids, pos, meta, kv))
    hook = _RecordingLora()
    model.set_lora(hook)
    edited = model.compute_logits(model.forward(ids, pos, meta, kv))
    qkv = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
    assert hook.calls[:4] == [
        (0, "qkv_proj", (5, a.hidden_size), (5, qkv)),
        (0, "o_proj", (5, a.num_heads * a.head_dim), (5, a.hidden_size)),
        (0, "gate_up_proj", (5, a.hidden_size), (5, 2 * a.intermediate_size)),
        (0, "down_proj", (5, a.intermediate_size), (5, a.hidden_size)),
    ]
    assert len(hook.calls) == 4 * a.num_layers
    assert not torch.allclose(base, edited)
    hook.active = False  # an inactive manager costs nothing and changes nothing
    torch.testing.assert_close(model.compute_logits(model.forward(ids, pos, meta, kv)), base)
