"""The dense torch form (pack_dense, dense_mask, add_lora_dense) against the naive loop and
the segment path, with base-model tokens, mixed ranks and fused slices."""

from __future__ import annotations

import pytest
import torch

import kernels
from tests.support.lora_cases import assert_close, dense_inputs, make_case, naive_loop

pytestmark = pytest.mark.unit
SLICES = {1: [37], 2: [29, 40], 3: [48, 24, 24]}


def run_dense(case, slots: list[int] | None = None) -> torch.Tensor:
    a_pack, b_pack, mask = dense_inputs(case, slots)
    y = case.y.clone()
    kernels.add_lora_dense(y, case.x, a_pack, b_pack, mask, case.slice_sizes)
    return y


@pytest.mark.parametrize("num_slices", [1, 2, 3])
@pytest.mark.parametrize("num_tokens", [1, 9, 40])
def test_dense_matches_naive_loop_and_segment_path(num_slices: int, num_tokens: int) -> None:
    case = make_case(num_tokens, 70, SLICES[num_slices], num_slots=6, seed=num_tokens,
                     ranks=(4, 8, 16))
    y = run_dense(case)
    assert_close(y, naive_loop(case), torch.float32)
    seg = case.y.clone()
    meta = kernels.build_meta(case.token_to_slot, 6)
    kernels.add_lora(seg, case.x, case.lora_a, case.lora_b, case.scales, meta,
                     case.slice_sizes)
    torch.testing.assert_close(y, seg, atol=1e-5, rtol=1e-5)


def test_base_rows_are_bit_for_bit_untouched_and_unused_slots_ignored() -> None:
    t2s = torch.tensor([-1, 2, -1, 4, 2, -1], dtype=torch.int32)
    case = make_case(6, 33, [48, 24, 24], num_slots=6, seed=3, ranks=(8,), token_to_slot=t2s)
    # A slot that no token uses may hold anything: with a non-finite value it would poison
    # every row if it were packed (0 * inf = nan).
    case.lora_a[:, 0] = float("inf")
    y = run_dense(case)
    base = t2s < 0
    assert torch.equal(y[base], case.y[base])
    assert torch.isfinite(y).all()
    assert_close(y, naive_loop(case), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_y_rounds_once(dtype: torch.dtype) -> None:
    case = make_case(17, 70, SLICES[3], num_slots=4, dtype=dtype, seed=8, ranks=(4, 16))
    y = run_dense(case)
    assert y.dtype == dtype
    assert_close(y, naive_loop(case), dtype)
