"""add_lora, lora_shrink and lora_expand against the reference and a naive per-token loop.

Every test runs twice through the `backend` fixture: on the torch path and on the Triton
kernels under TRITON_INTERPRET=1. Shapes stay small because the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.reference import add_lora_reference, expand_reference, shrink_reference
from tests.support.lora_cases import assert_close, make_case, naive_loop

# in_features and slice widths are deliberately not multiples of any tile size.
SLICES = {1: [37], 2: [29, 40], 3: [48, 24, 24]}


def run_add_lora(case) -> torch.Tensor:
    y = case.y.clone()
    meta = kernels.build_meta(case.token_to_slot, case.lora_a.shape[1])
    kernels.add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, meta, case.slice_sizes)
    return y


@pytest.mark.unit
@pytest.mark.parametrize("num_tokens", [1, 7, 33, 128])
@pytest.mark.parametrize("num_slices", [1, 2, 3])
def test_matches_reference_and_naive_loop(backend: str, num_tokens: int, num_slices: int) -> None:
    case = make_case(num_tokens, 100, SLICES[num_slices], num_slots=32, seed=num_tokens)
    y = run_add_lora(case)
    ref = add_lora_reference(
        case.y, case.x, case.lora_a, case.lora_b, case.scales, case.token_to_slot,
        case.slice_sizes,
    )
    assert_close(y, ref, torch.float32)
    assert_close(y, naive_loop(case), torch.float32)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_accumulate_in_float32(backend: str, dtype: torch.dtype) -> None:
    case = make_case(33, 70, SLICES[3], num_slots=8, dtype=dtype, seed=5)
    y = run_add_lora(case)
    assert y.dtype == dtype
    assert_close(y, naive_loop(case), dtype)


@pytest.mark.unit
def test_mixed_ranks_in_one_batch_each_use_their_own_rank(backend: str) -> None:
    # One token per rank class, so a rank mix-up in any slot shows in its row.
    t2s = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0], dtype=torch.int32)
    case = make_case(8, 65, [33], num_slots=4, seed=11, token_to_slot=t2s)
    assert case.ranks == [4, 8, 16, 64]
    assert_close(run_add_lora(case), naive_loop(case), torch.float32)


@pytest.mark.unit
def test_rows_without_adapter_are_untouched(backend: str) -> None:
    case = make_case(33, 50, SLICES[2], num_slots=6, seed=2, no_adapter_fraction=0.5)
    off = case.token_to_slot < 0
    assert 0 < int(off.sum()) < 33
    y = run_add_lora(case)
    assert torch.equal(y[off], case.y[off])
    assert not torch.equal(y[~off], case.y[~off])


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_without_adapter_leaves_y_unchanged(backend: str, dtype: torch.dtype) -> None:
    t2s = torch.full((7,), -1, dtype=torch.int32)
    case = make_case(7, 40, SLICES[3], num_slots=4, dtype=dtype, token_to_slot=t2s)
    assert torch.equal(run_add_lora(case), case.y)


@pytest.mark.unit
def test_shrink_then_expand_matches_the_phases_of_the_reference(backend: str) -> None:
    case = make_case(20, 90, SLICES[2], num_slots=5, seed=9)
    meta = kernels.build_meta(case.token_to_slot, 5)
    h = kernels.lora_shrink(case.x, case.lora_a, case.scales, meta)
    h_ref = shrink_reference(case.x, case.lora_a, case.scales, case.token_to_slot)
    assert h.dtype == torch.float32
    assert_close(h, h_ref, torch.float32)
    y = case.y.clone()
    kernels.lora_expand(y, h, case.lora_b, meta, case.slice_sizes)
    expected = expand_reference(case.y, h_ref, case.lora_b, case.token_to_slot, case.slice_sizes)
    assert_close(y, expected, torch.float32)


@pytest.mark.unit
def test_single_slice_default_covers_all_of_y(backend: str) -> None:
    case = make_case(7, 30, [45], num_slots=3, seed=4)
    y = case.y.clone()
    meta = kernels.build_meta(case.token_to_slot, 3)
    kernels.add_lora(y, case.x, case.lora_a, case.lora_b, case.scales, meta)
    assert_close(y, naive_loop(case), torch.float32)


@pytest.mark.unit
def test_inconsistent_shapes_are_refused() -> None:
    case = make_case(4, 30, [20, 10], num_slots=3)
    meta = kernels.build_meta(case.token_to_slot, 3)
    args = (case.y, case.x, case.lora_a, case.lora_b, case.scales, meta)
    with pytest.raises(ValueError, match="slice"):
        kernels.add_lora(*args, [20, 11])
    with pytest.raises(ValueError, match="slice"):
        kernels.add_lora(*args)  # two slices in lora_b, one implied
    with pytest.raises(TypeError):
        kernels.add_lora(case.y, case.x.half(), *args[2:], [20, 10])
    with pytest.raises(ValueError, match="tokens"):
        kernels.add_lora(case.y, case.x, case.lora_a, case.lora_b, case.scales,
                         kernels.build_meta(case.token_to_slot[:3], 3), [20, 10])


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_tokens_beside_a_prefill_segment(
    backend: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 12 adapters with 1-2 decode tokens each, one 30-token prefill and some base tokens,
    # interleaved: on the torch path the short segments take the padded table bmm and the
    # long one the per-segment loop.
    decode = [s for s in range(12) for _ in range(1 + s % 2)]
    t2s = torch.tensor(decode + [12] * 30 + [-1] * 5, dtype=torch.int32)
    t2s = t2s[torch.randperm(t2s.shape[0], generator=torch.Generator().manual_seed(0))]
    case = make_case(t2s.shape[0], 72, SLICES[2], num_slots=13, dtype=dtype, seed=3,
                     token_to_slot=t2s)
    from kernels import torch_lora

    calls: list[int] = []
    real = torch_lora._table_into
    monkeypatch.setattr(torch_lora, "_table_into",
                        lambda *a: calls.append(len(a[-1])) or real(*a))
    assert_close(run_add_lora(case), naive_loop(case), dtype)
    assert calls == ([12] if backend == "torch" else [])
