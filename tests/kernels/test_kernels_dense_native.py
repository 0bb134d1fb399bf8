"""The native CPU op of add_lora_dense (kernels/csrc/lora_cpu.cpp) against its torch form.

Packs and masks as runtime/lora/layers.py builds them (pack_dense, dense_mask: several slots,
mixed ranks, fused slices, base-model tokens), and general masks that no adapter layout
makes; sizes off the vector width (in 70, slices of 29 or 37 outputs) and on it. Poisoned
columns of an adapter a token does not use must not reach it, and a base token's row must not
change at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import kernels
from kernels import torch_lora
from tests.support.lora_cases import assert_close, dense_inputs, make_case, naive_loop
from tests.support.native_variants import not_in_a_rerun, rerun_under_variant

pytestmark = pytest.mark.unit
SLICES = {1: [37], 2: [29, 40], 3: [48, 24, 24]}
TOL = dict(rtol=1e-5, atol=1e-5)  # the LoRA terms and y are O(1) in these cases


@pytest.fixture(scope="module")
def op() -> Callable[..., None]:
    built = torch_lora._native_op()
    if built is None:
        pytest.fail("the native add_lora_dense op did not build (see the log)")
    return built


def both(op, y, x, a_pack, b_pack, mask, sizes) -> tuple[torch.Tensor, torch.Tensor]:
    native, oracle = y.clone(), y.clone()
    op(native, x, a_pack, b_pack, mask, sizes)
    torch_lora.add_lora_dense_torch(oracle, x, a_pack, b_pack, mask)
    return native, oracle


@pytest.mark.parametrize("num_slices", [1, 2, 3])
@pytest.mark.parametrize("num_tokens", [1, 2, 5, 33, 64])
@pytest.mark.parametrize(("in_features", "ranks", "num_slots"),
                         [(70, (4, 8, 16), 6), (64, (16,), 2), (577, (8, 16), 3),
                          (33, (64,), 2)])
def test_native_equals_the_torch_form_on_packed_adapters(
    op, num_slices: int, num_tokens: int, in_features: int, ranks: tuple[int, ...],
    num_slots: int,
) -> None:
    case = make_case(num_tokens, in_features, SLICES[num_slices], num_slots=num_slots,
                     seed=num_tokens * 7 + num_slices, ranks=ranks)
    a_pack, b_pack, mask = dense_inputs(case) if (case.token_to_slot >= 0).any() else (
        dense_inputs(case, slots=[0]))
    native, oracle = both(op, case.y, case.x, a_pack, b_pack, mask, case.slice_sizes)
    torch.testing.assert_close(native, oracle, **TOL)
    assert_close(native, naive_loop(case), torch.float32)
    base = case.token_to_slot < 0
    assert torch.equal(native[base], case.y[base])  # bit for bit: never written


def test_mask_columns_past_a_slots_own_rank_are_zero_and_change_no_bit(op) -> None:
    """An r4 adapter packed beside an r16 one: its rows 4..15 are zero in the packs, so the
    mask zeroes them (the op skips them) and y is bitwise what the full-rank mask gives."""
    case = make_case(24, 70, SLICES[3], num_slots=2, seed=11, ranks=(4, 16),
                     no_adapter_fraction=0.2)
    slots, rank = [0, 1], 16
    a_pack, b_pack, mask = dense_inputs(case, slots=slots)
    full = kernels.dense_mask(case.token_to_slot.tolist(), slots, rank, case.scales.tolist(), 3)
    per_slot = mask.view(24, 3, 2, rank)
    r4_tokens = case.token_to_slot == 0
    assert r4_tokens.any() and (case.token_to_slot == 1).any()
    assert (per_slot[r4_tokens][:, :, 0, :4] != 0).all()
    assert (per_slot[:, :, 0, 4:] == 0).all()  # past slot 0's own rank
    assert torch.equal(mask != 0, (full != 0) & (mask != 0)) and (mask != full).any()
    native, with_full = case.y.clone(), case.y.clone()
    op(native, case.x, a_pack, b_pack, mask, case.slice_sizes)
    op(with_full, case.x, a_pack, b_pack, full, case.slice_sizes)
    assert torch.equal(native, with_full)
    assert_close(native, naive_loop(case), torch.float32)


@pytest.mark.parametrize(("num_slices", "width", "density"),
                         [(1, 8, 0.5), (3, 160, 0.7), (2, 96, 1.0), (2, 17, 0.2)])
def test_any_mask_not_only_one_slot_per_token(
    op, num_slices: int, width: int, density: float
) -> None:
    """Masks beyond dense_mask's layout: several slots per token, more nonzero columns in a
    slice than the op holds at once (64), different scales within a row, empty rows."""
    g = torch.Generator().manual_seed(width)
    sizes, in_features, num_tokens = SLICES[num_slices], 90, 41
    cols = num_slices * width
    a_pack = torch.randn(cols, in_features, generator=g) / in_features**0.5
    b_pack = torch.zeros(cols, sum(sizes))
    off = 0
    for j, n in enumerate(sizes):
        b_pack[j * width : (j + 1) * width, off : off + n] = torch.randn(width, n, generator=g)
        off += n
    b_pack /= width**0.5
    mask = torch.rand(num_tokens, cols, generator=g)
    mask = torch.where(mask < density, mask * 2, 0.0)
    mask[::5] = 0  # every fifth token on the base model
    x = torch.randn(num_tokens, in_features, generator=g)
    y = torch.randn(num_tokens, sum(sizes), generator=g)
    native, oracle = both(op, y, x, a_pack, b_pack, mask, sizes)
    torch.testing.assert_close(native, oracle, **TOL)
    assert torch.equal(native[::5], y[::5])


@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_poison_in_an_adapter_a_token_does_not_use_never_reaches_it(op, poison: float) -> None:
    """In the torch form 0 * inf = nan would leak another adapter's non-finite weights into
    every token; the op reads only a token's own columns."""
    t2s = torch.tensor([0, 1, -1, 2, 1, 0, -1, 2, 2] * 3, dtype=torch.int32)
    case = make_case(len(t2s), 70, SLICES[3], num_slots=3, seed=5, ranks=(8, 16, 4),
                     token_to_slot=t2s)
    a_pack, b_pack, mask = dense_inputs(case)
    clean, _ = both(op, case.y, case.x, a_pack, b_pack, mask, case.slice_sizes)
    # Slot 1's columns (k = 1 of slots [0, 1, 2], rank 16) in every slice, in both packs.
    rank, num_slots = 16, 3
    for j in range(3):
        start = (j * num_slots + 1) * rank
        a_pack[start : start + rank] = poison
        b_pack[start : start + rank] = poison
    y = case.y.clone()
    op(y, case.x, a_pack, b_pack, mask, case.slice_sizes)
    others = t2s != 1
    assert torch.isfinite(y[others]).all()
    assert torch.equal(y[others], clean[others])
    assert not torch.isfinite(y[t2s == 1]).any()  # its own tokens do see it, as they must


def test_a_tokens_row_depends_neither_on_the_batch_nor_on_the_threads(op) -> None:
    """Tokens of one adapter are computed in groups of up to four; the sums run in one order
    whatever the group, so a token alone and in a batch, on 1 or 2 threads, agree bit for
    bit (the torch form's GEMM does not promise that)."""
    case = make_case(23, 577, SLICES[3], num_slots=3, seed=11, ranks=(8, 16))
    a_pack, b_pack, mask = dense_inputs(case)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        batch = case.y.clone()
        op(batch, case.x, a_pack, b_pack, mask, case.slice_sizes)
        torch.set_num_threads(2)
        batch2 = case.y.clone()
        op(batch2, case.x, a_pack, b_pack, mask, case.slice_sizes)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batch, batch2)
    for i in range(case.x.shape[0]):
        alone = case.y[i : i + 1].clone()
        op(alone, case.x[i : i + 1], a_pack, b_pack, mask[i : i + 1], case.slice_sizes)
        assert torch.equal(alone[0], batch[i]), i


def _good() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(y=torch.zeros(4, 30), x=torch.randn(4, 16, generator=g),
                a_pack=torch.randn(2 * 8, 16, generator=g),
                b_pack=torch.randn(2 * 8, 30, generator=g), mask=torch.ones(4, 16),
                slice_sizes=[20, 10])


@pytest.mark.parametrize(("change", "match"), [
    (dict(y=torch.zeros(4, 30, dtype=torch.float64)), "float32"),
    (dict(x=torch.zeros(4, 16, dtype=torch.bfloat16)), "float32"),
    (dict(mask=torch.ones(4, 16, dtype=torch.int32)), "float32"),
    (dict(y=torch.zeros(4, 30, dtype=torch.bfloat16)), "bfloat16 x"),
    (dict(y=torch.zeros(4, 30, dtype=torch.bfloat16), x=torch.zeros(4, 16, dtype=torch.bfloat16),
          a_pack=torch.zeros(16, 16, dtype=torch.bfloat16)), "float32"),
    (dict(x=torch.zeros(16, 4).t()), "contiguous"),
    (dict(x=torch.zeros(4, 17)), "in=16, x has 17"),
    (dict(x=torch.zeros(3, 16)), "one row per token"),
    (dict(mask=torch.ones(4, 15)), "pack columns"),
    (dict(b_pack=torch.zeros(15, 30)), "pack columns"),
    (dict(b_pack=torch.zeros(16, 31)), "outputs"),
    (dict(slice_sizes=[20, 11]), "exceed"),
    (dict(slice_sizes=[20, 9]), "must sum"),
    (dict(slice_sizes=[30, 0]), "positive"),
    (dict(slice_sizes=[-5, 35]), "positive"),
    (dict(slice_sizes=[10, 10, 10]), "not num_slices"),
    (dict(slice_sizes=[]), "not num_slices"),
    (dict(x=torch.zeros(4)), "2-D"),
])
def test_bad_arguments_raise_a_clear_error(op, change: dict, match: str) -> None:
    args = _good() | change
    with pytest.raises(RuntimeError, match=match):
        op(*args.values())


def test_y_overlapping_an_input_is_refused(op) -> None:
    args = _good()
    shared = torch.zeros(4 * 30)
    args["y"], args["x"] = shared.view(4, 30), shared[: 4 * 16].view(4, 16)
    with pytest.raises(RuntimeError, match="memory location"):
        op(*args.values())


def test_add_lora_dense_takes_the_native_op_on_cpu_float32(
    op, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[int]] = []

    def spy(y, x, a_pack, b_pack, mask, sizes) -> None:
        calls.append(list(sizes))
        op(y, x, a_pack, b_pack, mask, sizes)

    monkeypatch.setattr(torch_lora, "_native_op", lambda: spy)
    case = make_case(9, 70, SLICES[3], num_slots=3, seed=2, ranks=(8,))
    a_pack, b_pack, mask = dense_inputs(case)
    y = case.y.clone()
    kernels.add_lora_dense(y, case.x, a_pack, b_pack, mask, case.slice_sizes)
    assert calls == [case.slice_sizes]
    assert_close(y, naive_loop(case), torch.float32)
    # Without slice sizes: one slice over all outputs (b_pack's zero blocks make it the same).
    one = case.y.clone()
    kernels.add_lora_dense(one, case.x, a_pack, b_pack, mask)
    assert calls[-1] == [sum(case.slice_sizes)]
    torch.testing.assert_close(one, y, **TOL)
    # Low-precision or strided inputs: the torch form.
    calls.clear()
    kernels.add_lora_dense(case.y.to(torch.bfloat16), case.x, a_pack, b_pack, mask)
    kernels.add_lora_dense(case.y.clone(), case.x.to(torch.bfloat16), a_pack, b_pack, mask)
    wide = torch.cat([case.x, case.x], dim=1)[:, : case.x.shape[1]]  # rows strided
    strided = case.y.clone()
    kernels.add_lora_dense(strided, wide, a_pack, b_pack, mask)
    assert calls == []
    torch.testing.assert_close(strided, y, **TOL)


def test_bfloat16_x_and_y_take_the_op_which_sums_in_float32(
    op, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dtype bfloat16: the op sums in float32 and y rounds once, as the torch form's add_
    does, so both agree to bf16 rounding; a base-only token's row stays bit for bit."""
    calls: list[torch.dtype] = []

    def spy(y, x, a_pack, b_pack, mask, sizes) -> None:
        calls.append(y.dtype)
        op(y, x, a_pack, b_pack, mask, sizes)

    monkeypatch.setattr(torch_lora, "_native_op", lambda: spy)
    case = make_case(9, 70, SLICES[3], num_slots=3, seed=5, ranks=(8,))
    a_pack, b_pack, mask = dense_inputs(case)
    mask[4] = 0.0  # token 4 on the base model
    y0, x = case.y.to(torch.bfloat16), case.x.to(torch.bfloat16)
    got, want = y0.clone(), y0.clone()
    kernels.add_lora_dense(got, x, a_pack, b_pack, mask, case.slice_sizes)
    assert calls == [torch.bfloat16]
    torch_lora.add_lora_dense_torch(want, x, a_pack, b_pack, mask)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)
    assert torch.equal(got[4], y0[4])


def test_an_op_that_cannot_build_leaves_the_torch_form_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from torch.utils import cpp_extension

    def broken(**_: object) -> None:
        raise OSError("g++: not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    unbuilt = torch_lora._native_op.__wrapped__
    with caplog.at_level(logging.WARNING):
        assert unbuilt() is None
    assert "loragate_lora_cpu" in caplog.text and "g++: not found" in caplog.text
    monkeypatch.setattr(torch_lora, "_native_op", unbuilt)
    case = make_case(9, 70, SLICES[2], num_slots=2, seed=4, ranks=(8,))
    a_pack, b_pack, mask = dense_inputs(case)
    y = case.y.clone()
    kernels.add_lora_dense(y, case.x, a_pack, b_pack, mask, case.slice_sizes)
    assert_close(y, naive_loop(case), torch.float32)


@pytest.mark.slow
@not_in_a_rerun
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_the_variants_for_lesser_cpus_pass_these_tests_too(capability: str) -> None:
    """One code path per build variant (kernels.native.variant): this file's op tests again
    in a process where torch reports a lesser CPU, which builds and loads that variant."""
    rerun_under_variant(__file__, capability, "equals or mask or poison or depends")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_the_op_runs_on_torchs_own_openmp_runtime(op) -> None:
    """Built with -fopenmp so that at::parallel_for is parallel at all; the libgomp it names
    must be the one torch loaded (one pool, sized by torch.set_num_threads), not a second."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) <= 1, runtimes
