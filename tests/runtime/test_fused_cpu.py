"""The fused CPU decode ops (runtime/model/fused_cpu.py) against the torch ops they replace:
rotary and KV write bitwise equal, the residual add bitwise equal, the norm within float32
rounding of F.rms_norm and transformers' LlamaRMSNorm, and bad arguments refused before any
write."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from runtime.model import fused_cpu
from runtime.model.llama import apply_rotary
from tests.support.native_variants import not_in_a_rerun, rerun_under_variant

pytestmark = [pytest.mark.unit, pytest.mark.skipif(
    not fused_cpu.load(), reason="the fused CPU ops did not build")]


def _rotary_tables(positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(positions.float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    signed = torch.cat((-sin[:, : dim // 2], sin[:, dim // 2:]), dim=-1)
    return emb.cos().unsqueeze(1), signed.unsqueeze(1)


@pytest.mark.parametrize(("tokens", "heads", "kv_heads", "dim"),
                         [(1, 9, 3, 64), (33, 9, 3, 64), (5, 4, 4, 128), (7, 8, 1, 32)])
def test_rope_write_kv_equals_rotary_and_index_copy_bitwise(
    tokens: int, heads: int, kv_heads: int, dim: int,
) -> None:
    gen = torch.Generator().manual_seed(tokens * 31 + dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen) * 3
    cos, sin = _rotary_tables(torch.randint(0, 4096, (tokens,), generator=gen), dim)
    pool_rows = 4 * tokens + 8
    k_pool = torch.randn(pool_rows, kv_heads, dim, generator=gen)
    v_pool = torch.randn(pool_rows, kv_heads, dim, generator=gen)
    slots = torch.randperm(pool_rows, generator=gen)[:tokens]
    want_k, want_v = k_pool.clone(), v_pool.clone()
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    want_q = apply_rotary(q.view(tokens, heads, dim), cos, sin)
    want_k.index_copy_(0, slots, apply_rotary(k.view(tokens, kv_heads, dim), cos, sin))
    want_v.index_copy_(0, slots, v.reshape(tokens, kv_heads, dim))

    got_q = fused_cpu.rope_write_kv(qkv, cos, sin, k_pool, v_pool, slots, heads, kv_heads)
    assert torch.equal(got_q, want_q)
    assert torch.equal(k_pool, want_k)  # the new rows, and every other row left as it was
    assert torch.equal(v_pool, want_v)


def test_rope_write_kv_refuses_a_row_outside_the_pool_before_writing() -> None:
    qkv = torch.randn(3, (2 + 2) * 16)
    cos, sin = _rotary_tables(torch.arange(3), 16)
    k_pool, v_pool = torch.zeros(8, 1, 16), torch.zeros(8, 1, 16)
    for bad in (torch.tensor([0, 1, 8]), torch.tensor([0, -1, 2])):
        with pytest.raises(RuntimeError, match="outside the pool"):
            fused_cpu.rope_write_kv(qkv, cos, sin, k_pool, v_pool, bad, 2, 1)
        assert not k_pool.any() and not v_pool.any()


@pytest.mark.parametrize("case", ["width", "dtype", "slots", "pools"])
def test_rope_write_kv_refuses_mismatched_arguments(case: str) -> None:
    qkv = torch.randn(3, (2 + 2) * 16)
    cos, sin = _rotary_tables(torch.arange(3), 16)
    k_pool, v_pool = torch.zeros(8, 1, 16), torch.zeros(8, 1, 16)
    slots = torch.tensor([0, 1, 2])
    if case == "width":
        qkv = torch.randn(3, 5 * 16)
    elif case == "dtype":
        qkv = qkv.double()
    elif case == "slots":
        slots = slots.int()
    else:
        v_pool = torch.zeros(8, 2, 16)
    with pytest.raises(RuntimeError):
        fused_cpu.rope_write_kv(qkv, cos, sin, k_pool, v_pool, slots, 2, 1)


@pytest.mark.parametrize(("tokens", "hidden"), [(1, 576), (32, 576), (7, 100), (3, 4096)])
def test_add_rms_norm_adds_bitwise_and_normalizes_within_float32_rounding(
    tokens: int, hidden: int,
) -> None:
    gen = torch.Generator().manual_seed(hidden + tokens)
    h = torch.randn(tokens, hidden, generator=gen) * 5
    delta = torch.randn(tokens, hidden, generator=gen)
    weight = torch.randn(hidden, generator=gen)
    want_h = h + delta
    ref = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(weight)
        want = ref(want_h)
    got = fused_cpu.add_rms_norm(h, delta, weight, 1e-5)
    assert torch.equal(h, want_h)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, F.rms_norm(want_h, (hidden,), weight, 1e-5),
                               rtol=1e-6, atol=1e-6)


def test_add_rms_norm_without_delta_leaves_h_alone() -> None:
    h = torch.randn(4, 64)
    before = h.clone()
    got = fused_cpu.add_rms_norm(h, None, torch.ones(64), 1e-6)
    assert torch.equal(h, before)
    torch.testing.assert_close(got, F.rms_norm(before, (64,), torch.ones(64), 1e-6))


def test_add_rms_norm_keeps_nan_rows_to_themselves() -> None:
    """A non-finite row stays in its row: the engine's check then stops only its sequence."""
    h = torch.randn(3, 32)
    h[1, 5] = float("nan")
    got = fused_cpu.add_rms_norm(h, None, torch.ones(32), 1e-6)
    assert got[1].isnan().all()
    assert got[[0, 2]].isfinite().all()


def test_add_rms_norm_refuses_mismatched_arguments() -> None:
    h = torch.randn(4, 64)
    with pytest.raises(RuntimeError):
        fused_cpu.add_rms_norm(h, torch.randn(4, 32), torch.ones(64), 1e-6)
    with pytest.raises(RuntimeError):
        fused_cpu.add_rms_norm(h, None, torch.ones(32), 1e-6)
    with pytest.raises(RuntimeError):
        fused_cpu.add_rms_norm(h.double(), None, torch.ones(64).double(), 1e-6)
    with pytest.raises(RuntimeError, match="h itself"):
        fused_cpu.add_rms_norm(h, h, torch.ones(64), 1e-6)


@pytest.mark.parametrize(("tokens", "inter"), [(1, 1536), (32, 1536), (5, 17)])
def test_silu_mul_matches_torch_within_float32_rounding(tokens: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(tokens + inter)
    gate_up = torch.randn(tokens, 2 * inter, generator=gen) * 4
    gate_up[0, :4] = torch.tensor([0.0, -0.0, 95.0, -95.0])  # exp's range ends and zero
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = fused_cpu.silu_mul(gate_up)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-30)


def test_silu_mul_keeps_nan_rows_to_themselves() -> None:
    gate_up = torch.randn(3, 64)
    gate_up[1, 3] = float("nan")
    got = fused_cpu.silu_mul(gate_up)
    assert got[1, 3].isnan()
    assert got[[0, 2]].isfinite().all()
    with pytest.raises(RuntimeError):
        fused_cpu.silu_mul(torch.randn(3, 63))


def _bf16_layer_tensors(tokens: int, hidden: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(tokens, hidden, generator=gen) * 3).bfloat16() for _ in range(2)]


@pytest.mark.parametrize("tokens", [1, 32])
def test_bfloat16_norm_and_silu_round_like_the_torch_ops(tokens: int) -> None:
    """--dtype bfloat16: the residual add is bitwise torch's bf16 add, the norm and silu within
    one bfloat16 rounding of llama.rms_norm / F.silu(gate).mul_(up) (the float sum and exp
    differ in the last float bits, which can flip a rounding)."""
    from runtime.model.llama import rms_norm

    h, delta = _bf16_layer_tensors(tokens, 576, tokens)
    weight = torch.randn(576).bfloat16()
    want_h = h.clone().add_(delta)
    want = rms_norm(want_h, weight, 1e-5)
    got = fused_cpu.add_rms_norm(h, delta, weight, 1e-5)
    assert got.dtype == torch.bfloat16
    assert torch.equal(h, want_h)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)
    assert (got == want).float().mean() > 0.99

    gate_up = torch.cat(_bf16_layer_tensors(tokens, 1536, tokens + 1), dim=-1)
    gate, up = gate_up.chunk(2, dim=-1)
    want_act = F.silu(gate).mul_(up)
    got_act = fused_cpu.silu_mul(gate_up)
    assert got_act.dtype == torch.bfloat16
    torch.testing.assert_close(got_act.float(), want_act.float(), rtol=2 ** -7, atol=1e-6)
    assert (got_act == want_act).float().mean() > 0.99


def test_bfloat16_qkv_rotates_in_float32_like_the_torch_path() -> None:
    tokens, heads, kv_heads, dim = 6, 9, 3, 64
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).bfloat16()
    cos, sin = _rotary_tables(torch.arange(tokens) * 7, dim)
    k_pool, v_pool = torch.zeros(16, kv_heads, dim), torch.zeros(16, kv_heads, dim)
    slots = torch.arange(tokens) + 3
    q, k, v = qkv.float().split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    got = fused_cpu.rope_write_kv(qkv, cos, sin, k_pool, v_pool, slots, heads, kv_heads)
    assert got.dtype == torch.float32
    assert torch.equal(got, apply_rotary(q.reshape(tokens, heads, dim), cos, sin))
    assert torch.equal(k_pool[slots], apply_rotary(k.reshape(tokens, kv_heads, dim), cos, sin))
    assert torch.equal(v_pool[slots], v.reshape(tokens, kv_heads, dim))


@pytest.mark.slow
@not_in_a_rerun
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_the_variants_for_lesser_cpus_pass_these_tests_too(capability: str) -> None:
    """The ops' tests again under each lesser CPU variant of the build."""
    rerun_under_variant(__file__, capability, "not variants")
