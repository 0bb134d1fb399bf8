"""The Triton kernels under TRITON_INTERPRET=1: tile configurations, split-K and dispatch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels.reference import shrink_reference
from tests.support.lora_cases import assert_close, make_case, naive_loop

triton_lora = pytest.importorskip("kernels.triton_lora")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# Small explicit tiles, so that several K iterations, split-K partial sums (atomic adds) and
# ragged last tiles all happen on shapes the interpreter runs quickly.
SHRINK_CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT_K=1),
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT_K=3),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2),
]


@pytest.mark.unit
@pytest.mark.parametrize("cfg", SHRINK_CONFIGS, ids=["k16", "k16-split3", "m32-split2"])
def test_shrink_split_k_and_ragged_tiles(cfg: dict[str, int]) -> None:
    case = make_case(40, 83, [20, 12], num_slots=6, seed=21)
    meta = kernels.build_meta(case.token_to_slot, 6)
    out = torch.zeros(2, 40, case.lora_a.shape[2])
    triton_lora.lora_shrink(
        case.x, case.lora_a, case.scales, meta, out, interpret=True, config=cfg
    )
    assert_close(out, shrink_reference(case.x, case.lora_a, case.scales, case.token_to_slot),
                 torch.float32)


@pytest.mark.unit
@pytest.mark.parametrize("block_k", [16, 32])
def test_expand_loops_over_rank_tiles(block_k: int) -> None:
    # max_rank 64 over K tiles of 16 or 32: the rank loop runs 4 or 2 times.
    case = make_case(24, 50, [30, 17, 17], num_slots=4, seed=8)
    y = case.y.clone()
    meta = kernels.build_meta(case.token_to_slot, 4)
    h = kernels.lora_shrink(case.x, case.lora_a, case.scales, meta)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k)
    triton_lora.lora_expand(y, h, case.lora_b, meta, case.slice_sizes, interpret=True, config=cfg)
    assert_close(y, naive_loop(case), torch.float32)


@pytest.mark.unit
def test_prefill_sized_batch_uses_the_prefill_tiles() -> None:
    # Over the decode threshold: M tiles of 64 and segments spanning several of them.
    t2s = torch.tensor([0] * 150 + [1] * 20 + [-1] * 10 + [2] * 20, dtype=torch.int32)
    case = make_case(200, 40, [24], num_slots=3, seed=6, token_to_slot=t2s)
    assert triton_lora._shrink_config(200, 40, 64)["BLOCK_M"] == 64
    y = case.y.clone()
    kernels.add_lora(y, case.x, case.lora_a, case.lora_b, case.scales,
                     kernels.build_meta(t2s, 3), case.slice_sizes)
    assert_close(y, naive_loop(case), torch.float32)


@pytest.mark.unit
def test_strided_inputs_are_read_through_their_strides() -> None:
    case = make_case(9, 48, [16, 16], num_slots=3, seed=13)
    wide_x = torch.randn(9, 96)
    wide_x[:, ::2] = case.x  # x as a strided view: stride(1) == 2
    y = case.y.clone()
    kernels.add_lora(y, wide_x[:, ::2], case.lora_a, case.lora_b, case.scales,
                     kernels.build_meta(case.token_to_slot, 3), case.slice_sizes)
    assert_close(y, naive_loop(case), torch.float32)


@pytest.mark.unit
def test_interpret_env_routes_cpu_tensors_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("lora_shrink", "lora_expand"):
        real = getattr(triton_lora, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(triton_lora, name, spy)
    case = make_case(5, 20, [16], num_slots=2, seed=1)
    meta = kernels.build_meta(case.token_to_slot, 2)
    kernels.add_lora(case.y.clone(), case.x, case.lora_a, case.lora_b, case.scales, meta)
    assert calls == ["lora_shrink", "lora_expand"]
    calls.clear()
    monkeypatch.delenv("TRITON_INTERPRET")
    kernels.add_lora(case.y.clone(), case.x, case.lora_a, case.lora_b, case.scales, meta)
    assert calls == []


@pytest.mark.unit
def test_importing_kernels_does_not_import_triton() -> None:
    code = "import sys, kernels; assert 'triton' not in sys.modules, 'triton imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.unit
def test_interpreter_works_when_set_before_triton_is_imported() -> None:
    # The other order from the fixtures above: TRITON_INTERPRET=1 already in the environment
    # when triton is first imported (which turns its own @jit helpers into interpreted ones).
    code = (
        "import torch, triton, kernels\n"
        "from kernels.reference import add_lora_reference\n"
        "t2s = torch.tensor([1, -1, 0, 1], dtype=torch.int32)\n"
        "a, b = torch.randn(1, 2, 8, 24), torch.randn(1, 2, 20, 8)\n"
        "x, y, s = torch.randn(4, 24), torch.randn(4, 20), torch.rand(2)\n"
        "ref = add_lora_reference(y, x, a, b, s, t2s)\n"
        "kernels.add_lora(y, x, a, b, s, kernels.build_meta(t2s, 2))\n"
        "torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
