"""The CPU paged-attention kernel against the gather path (index_select + SDPA) as oracle.

Random pools, shuffled block tables and ragged lengths (GQA, contexts ending on and just past
block boundaries), decode tokens mixed with prefill chunks in one step; rows the kernel must
not read hold NaN, so a read past a length shows up as a NaN answer, not as a small error.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from runtime.model import paged_attention_cpu
from runtime.model.attention import (
    PAGED_PREFILL_MAX,
    build_metadata,
    paged_attention,
    use_paged_kernel,
)
from tests.support.native_variants import not_in_a_rerun, rerun_under_variant

pytestmark = pytest.mark.unit
BLOCK = 16


@pytest.fixture(scope="module")
def kernel() -> None:
    if paged_attention_cpu.load() is None:
        pytest.fail("the CPU paged attention kernel did not build (see the log)")


def make_step(
    rng: random.Random, steps: list[tuple[int, int]], num_blocks: int
) -> list[tuple[list[int], int, int]]:
    """(num_cached, num_new) per sequence -> (block_table, num_cached, num_new), each sequence
    on its own shuffled blocks, tables one block longer than needed (as the manager's can be)."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs = []
    for num_cached, num_new in steps:
        need = (num_cached + num_new + BLOCK - 1) // BLOCK + 1
        seqs.append(([free.pop() for _ in range(need)], num_cached, num_new))
    return seqs


def pools(
    seqs: list[tuple[list[int], int, int]], num_blocks: int, kv_heads: int, dim: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V pools holding NaN everywhere but in each sequence's own context rows."""
    shape = (num_blocks * BLOCK, kv_heads, dim)
    k, v = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    for table, num_cached, num_new in seqs:
        for p in range(num_cached + num_new):
            r = table[p // BLOCK] * BLOCK + p % BLOCK
            k[r], v[r] = torch.randn(kv_heads, dim, generator=gen), torch.randn(
                kv_heads, dim, generator=gen)
    return k, v


def random_step(
    rng: random.Random, gen: torch.Generator, steps: list[tuple[int, int]], num_blocks: int,
    heads: int, kv_heads: int, dim: int,
) -> tuple[list[tuple[list[int], int, int]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step of `steps` (cached, new tokens) over scattered tables: (seqs, q, k, v)."""
    seqs = make_step(rng, steps, num_blocks)
    k, v = pools(seqs, num_blocks, kv_heads, dim, gen)
    q = torch.randn(sum(n for _, _, n in seqs), heads, dim, generator=gen)
    return seqs, q, k, v


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (8, 2, 64), (4, 2, 16),
                                                        (8, 8, 32), (16, 2, 128), (6, 3, 48)])
def test_kernel_equals_the_gather_path_on_ragged_gqa_steps(
    kernel: None, heads: int, kv_heads: int, dim: int
) -> None:
    rng = random.Random(heads * 100 + dim)
    gen = torch.Generator().manual_seed(dim)
    steps = [(0, 1), (15, 1), (16, 1), (31, 1), (47, 1), (200, 1), (5, 1), (63, 1),
             (20, 2), (33, PAGED_PREFILL_MAX), (40, PAGED_PREFILL_MAX + 1), (0, 9)]
    seqs, q, k, v = random_step(rng, gen, steps, 64, heads, kv_heads, dim)
    scale = dim**-0.5

    paged = build_metadata(seqs, BLOCK, "cpu", paged=True)
    assert paged.paged is not None
    # Decode and the short chunks over context went to the kernel; the rest gathered.
    assert paged.decode_rows is None
    assert [c.num_tokens for c in paged.prefills] == [PAGED_PREFILL_MAX + 1, 9]
    got = paged_attention(q, k, v, paged, scale)
    want = paged_attention(q, k, v, build_metadata(seqs, BLOCK, "cpu"), scale)
    assert torch.isfinite(got).all()  # no NaN row outside a context was read
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 1, 128), (6, 3, 48)])
def test_long_contexts_split_over_threads_equal_the_gather_path_and_each_other(
    kernel: None, heads: int, kv_heads: int, dim: int
) -> None:
    """Contexts past the kernel's chunk (256 positions) are cut into chunks run on any thread
    and merged: lengths 1, on and next to chunk and block boundaries, scattered tables. The
    answer equals the gather path's and does not depend on the thread count, bit for bit."""
    rng = random.Random(dim)
    gen = torch.Generator().manual_seed(heads)
    steps = [(0, 1), (254, 1), (255, 1), (256, 1), (511, 1), (700, 1), (1030, 1), (16, 1),
             (600, 3)]
    seqs, q, k, v = random_step(rng, gen, steps, 256, heads, kv_heads, dim)
    scale = dim**-0.5
    meta = build_metadata(seqs, BLOCK, "cpu", paged=True)
    assert meta.paged is not None and not meta.prefills  # all of them in the kernel
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = paged_attention(q, k, v, meta, scale)
        torch.set_num_threads(max(2, threads))
        shared = paged_attention(q, k, v, meta, scale)
    finally:
        torch.set_num_threads(threads)
    want = paged_attention(q, k, v, build_metadata(seqs, BLOCK, "cpu"), scale)
    assert torch.isfinite(shared).all()
    torch.testing.assert_close(shared, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(alone, shared)


@pytest.mark.parametrize("cached", [20, 700])
def test_a_nan_in_free_and_other_sequences_blocks_leaves_a_decode_answer_bit_equal(
    kernel: None, cached: int
) -> None:
    """cached 700: both contexts span several of the kernel's chunks, merged per query."""
    gen = torch.Generator().manual_seed(3)
    need = cached // BLOCK + 1
    num_blocks, kv_heads, dim = 2 * need + 4, 2, 32
    order = torch.randperm(num_blocks, generator=gen).tolist()
    # cached + 1 tokens: all blocks of the table but the last whole, then (cached + 1) % 16
    # rows of it; the rest of that block is stale.
    mine = (order[:need], cached, 1)
    other = (order[need:2 * need + 1], cached + 5, 1)
    shape = (num_blocks * BLOCK, kv_heads, dim)
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    q = torch.randn(2, 4, dim, generator=gen)
    meta = build_metadata([mine, other], BLOCK, "cpu", paged=True)
    before = paged_attention(q, k, v, meta, 0.2)[0]

    mine_rows = {mine[0][p // BLOCK] * BLOCK + p % BLOCK for p in range(cached + 1)}
    poison = torch.tensor([r for r in range(num_blocks * BLOCK) if r not in mine_rows])
    k[poison], v[poison] = float("nan"), float("inf")  # free, the other's, own stale rows
    after = paged_attention(q, k, v, meta, 0.2)
    assert torch.equal(after[0], before)
    assert not torch.isfinite(after[1]).all()  # the other sequence reads its own NaN


def test_a_sequences_own_nan_comes_out_nan_for_the_engines_check(kernel: None) -> None:
    """The engine stops a sequence whose activations turned non-finite by checking its
    logits: the kernel must carry a NaN in the sequence's own context through, whether its
    score is the tile's max or not."""
    k, v = torch.randn(4 * BLOCK, 1, 16), torch.randn(4 * BLOCK, 1, 16)
    meta = build_metadata([([1, 3], 19, 1)], BLOCK, "cpu", paged=True)  # rows 16-31, 48-51
    q = torch.randn(1, 2, 16)
    for row in (BLOCK + 3, 3 * BLOCK + 2):
        kk = k.clone()
        kk[row] = float("nan")
        assert torch.isnan(paged_attention(q, kk, v, meta, 0.25)).all()
    vv = v.clone()
    vv[BLOCK] = float("nan")
    assert torch.isnan(paged_attention(q, k, vv, meta, 0.25)).all()


def test_a_nan_in_one_chunk_of_a_split_context_comes_out_nan_after_the_merge(
    kernel: None,
) -> None:
    """600 positions: three chunks merged. A NaN in the middle chunk's K or V, not its max,
    must still reach every head's answer."""
    gen = torch.Generator().manual_seed(5)
    num_blocks = 40
    table = torch.randperm(num_blocks, generator=gen)[:38].tolist()
    k, v = torch.randn(num_blocks * BLOCK, 1, 16), torch.randn(num_blocks * BLOCK, 1, 16)
    meta = build_metadata([(table, 599, 1)], BLOCK, "cpu", paged=True)
    q = torch.randn(1, 2, 16)
    assert torch.isfinite(paged_attention(q, k, v, meta, 0.25)).all()
    row = table[300 // BLOCK] * BLOCK + 300 % BLOCK
    for pool in (k, v):
        poisoned = pool.clone()
        poisoned[row] = float("nan")
        pair = (poisoned, v) if pool is k else (k, poisoned)
        assert torch.isnan(paged_attention(q, *pair, meta, 0.25)).all()


def test_the_kernel_refuses_tables_and_lengths_outside_the_pool(kernel: None) -> None:
    op = paged_attention_cpu.load()
    assert op is not None
    k = v = torch.zeros(2 * BLOCK, 1, 16)
    q, out = torch.zeros(1, 1, 16), torch.zeros(1, 1, 16)
    one = torch.zeros(1, dtype=torch.int32)
    for table, length in (([[2]], 1), ([[-1]], 1), ([[0]], BLOCK + 1), ([[0]], 0)):
        with pytest.raises(RuntimeError):
            op(q, k, v, torch.tensor(table, dtype=torch.int32), one, one,
               torch.tensor([length], dtype=torch.int32), out, BLOCK, 1.0)


@pytest.mark.slow
@not_in_a_rerun
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_the_variants_for_lesser_cpus_pass_these_tests_too(capability: str) -> None:
    """The kernel has one code path per build variant (kernels.native.variant); a machine
    runs only its own unless told otherwise. This one runs this file's kernel tests again in a
    process where torch reports a lesser CPU, which builds and loads that variant."""
    rerun_under_variant(__file__, capability, "equal or nan")


def test_a_kernel_that_cannot_build_falls_back_to_the_gather_path_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from torch.utils import cpp_extension

    def broken(**_: object) -> None:
        raise OSError("g++: not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(paged_attention_cpu, "load", paged_attention_cpu.load.__wrapped__)
    with caplog.at_level(logging.WARNING):
        assert not use_paged_kernel("auto", torch.device("cpu"), torch.float32, 4, 2, 16)
    assert "g++: not found" in caplog.text
    assert not use_paged_kernel("gather", torch.device("cpu"), torch.float32, 4, 2, 16)


def test_shapes_the_kernel_does_not_take_keep_the_gather_path() -> None:
    cpu = torch.device("cpu")
    assert not use_paged_kernel("auto", cpu, torch.float32, 4, 2, 24)  # 24 % 16
    assert not use_paged_kernel("auto", cpu, torch.float32, 6, 4, 16)  # 6 % 4
    assert not use_paged_kernel("auto", cpu, torch.bfloat16, 4, 2, 16)
    assert not use_paged_kernel("auto", torch.device("meta"), torch.float32, 4, 2, 16)
