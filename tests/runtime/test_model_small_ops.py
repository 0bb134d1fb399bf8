"""The decode step's fused small ops equal transformers' formulas bit for bit in float32.

The greedy oracles compare tokens; these compare every bit, so that a fused or in-place op
which rounds differently (a torch upgrade changing `F.rms_norm`, say) fails here by name
instead of as a rare token flip in a long generation.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from runtime.model.llama import apply_rotary, rms_norm

pytestmark = pytest.mark.unit

SHAPES = [(1, 64), (7, 128), (32, 576), (300, 576), (5, 960)]


@pytest.mark.parametrize(("tokens", "hidden"), SHAPES)
def test_rms_norm_is_bitwise_transformers(tokens: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(tokens * hidden)
    x = torch.randn(tokens, hidden, generator=gen) * 4
    ref = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(hidden, generator=gen))
        want = ref(x)
    assert torch.equal(rms_norm(x, ref.weight.detach(), 1e-5), want)


@pytest.mark.parametrize(("tokens", "heads", "kv_heads"), [(1, 9, 3), (32, 9, 3), (77, 4, 4)])
def test_rotary_is_bitwise_transformers(tokens: int, heads: int, kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    dim, half = 64, 32
    q = torch.randn(tokens, heads, dim, generator=gen)
    k = torch.randn(tokens, kv_heads, dim, generator=gen)
    angles = torch.rand(tokens, half, generator=gen) * 100
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos(), emb.sin()  # [tokens, dim]
    # transformers: [batch, heads, tokens, dim] with cos/sin [batch, tokens, dim].
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                          cos[None], sin[None])
    signed = torch.cat((-sin[:, :half], sin[:, half:]), -1)[:, None]
    assert torch.equal(apply_rotary(q, cos[:, None], signed), want_q[0].transpose(0, 1))
    assert torch.equal(apply_rotary(k, cos[:, None], signed), want_k[0].transpose(0, 1))
