"""Llama-family decoder forward for serving: flattened tokens of many sequences, paged KV cache.

Covers LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM: RMSNorm, rotary embeddings
(default, linear and llama3 scaling), grouped-query attention, SwiGLU MLP, q/k/v bias, tied or
untied embeddings. Numerics follow transformers (norms in float32, rotary in float32 tables).

LoRA hook (docs/internals.md): after each of the four base projections a layer calls
`lora.apply(layer_idx, name, x, y)` in place when a manager is attached and active.

The residual stream carries one pending term between ops: each layer returns its MLP output
unadded, and the next norm (the next layer's, or the final one) adds it as it normalizes, so
that on the CPU (float32 or bf16) the add and the norm are one fused call (fused_cpu.py), as
are the rotary and the KV write, and the MLP's silu(gate) * up. `fused=False` runs the same
steps as torch ops.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from runtime.model import fused_cpu
from runtime.model.attention import AttentionMetadata, paged_attention
from runtime.model.kv_cache import KVCache
from runtime.model.linear import Linear
from runtime.model.weights import ModelArgs, load_weights


class LoraHook(Protocol):
    active: bool

    def apply(self, layer_idx: int, name: str, x: torch.Tensor, y: torch.Tensor) -> None: ...


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # One fused op instead of six; bitwise equal to the lines below on float32 (checked by
        # tests/runtime/test_model_small_ops.py, so a torch that rounds differently fails there).
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    h: torch.Tensor,  # [num_tokens, hidden] residual stream: `delta` is added in place
    delta: torch.Tensor | None,  # [num_tokens, hidden] the pending term, or None
    weight: torch.Tensor,  # [hidden]
    eps: float,
    fused: bool,
) -> torch.Tensor:
    """rms_norm(h += delta); `fused`: one C++ call (CPU, float32 or bf16; fused_cpu.py)."""
    if fused:
        return fused_cpu.add_rms_norm(h, delta, weight, eps)
    if delta is not None:
        h.add_(delta)
    return rms_norm(h, weight, eps)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:  # [head_dim // 2] float32
    dim = args.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    scaling: dict[str, Any] = args.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def swap_halves(x: torch.Tensor) -> torch.Tensor:  # [..., head_dim]
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    x: torch.Tensor,  # [num_tokens, heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, 1, head_dim]
    signed_sin: torch.Tensor,  # [num_tokens, 1, head_dim]: sin with its first half negated
) -> torch.Tensor:
    """transformers' `x * cos + rotate_half(x) * sin`, bitwise: rotate_half(x) * sin equals
    swap_halves(x) * signed_sin exactly ((-a) * b == a * (-b) in IEEE), one op fewer."""
    return (x * cos).add_(swap_halves(x).mul_(signed_sin))


class DecoderLayer:
    def __init__(
        self, idx: int, w: dict[str, torch.Tensor], args: ModelArgs, gemm: str = "plain",
        fused: bool = False,
    ) -> None:
        """`gemm`: the projections' Linear backend (runtime/model/linear.py); a packed one
        takes each plain weight out of `w` as it goes (LlamaModel says why). `fused`: the
        norms, rotary, KV write and silu through fused_cpu.py."""
        self.idx = idx
        self.fused = fused
        self.args = args
        self.input_norm = w[f"layers.{idx}.input_norm"]
        self.post_norm = w[f"layers.{idx}.post_norm"]
        p = f"layers.{idx}."
        pack = gemm != "plain"

        def take(name: str) -> torch.Tensor:
            return w.pop(p + name) if pack else w[p + name]

        bias = w.pop(p + "qkv_bias", None) if pack else w.get(p + "qkv_bias")
        # [q + 2 * kv, hidden], with the q/k/v bias [q + 2 * kv] when the model has one
        self.qkv_proj = Linear(take("qkv_proj"), bias, backend=gemm)
        self.o_proj = Linear(take("o_proj"), backend=gemm)  # [hidden, q]
        self.gate_up_proj = Linear(take("gate_up_proj"), backend=gemm)  # [2 * inter, hidden]
        self.down_proj = Linear(take("down_proj"), backend=gemm)  # [hidden, inter]
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.scale = args.head_dim**-0.5
        self.lora: LoraHook | None = None

    def _linear(self, name: str, x: torch.Tensor, projection: Linear) -> torch.Tensor:
        y = projection(x)
        if self.lora is not None and self.lora.active:
            self.lora.apply(self.idx, name, x, y)
        return y

    def forward(
        self,
        h: torch.Tensor,  # [num_tokens, hidden] residual stream, before `pending`
        pending: torch.Tensor | None,  # [num_tokens, hidden] the previous layer's MLP output
        cos: torch.Tensor,  # [num_tokens, 1, head_dim]
        sin: torch.Tensor,  # [num_tokens, 1, head_dim], first half negated (apply_rotary)
        meta: AttentionMetadata,
        kv: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (residual stream, this layer's MLP output)
        a = self.args
        # In place: `h` is this forward's own residual stream (the embedding's output or the
        # previous layer's), never a tensor the caller holds.
        x = add_rms_norm(h, pending, self.input_norm, a.rms_norm_eps, self.fused)
        qkv = self._linear("qkv_proj", x, self.qkv_proj)
        if self.fused:
            q = fused_cpu.rope_write_kv(qkv, cos, sin, kv.k[self.idx], kv.v[self.idx],
                                        meta.slot_mapping, a.num_heads, a.num_kv_heads)
        else:
            q = self._rope_write_kv(qkv, cos, sin, meta, kv)
        attn = paged_attention(q, kv.k[self.idx], kv.v[self.idx], meta, self.scale)
        attn = attn.reshape(-1, self.q_size).to(h.dtype)
        x = add_rms_norm(h, self._linear("o_proj", attn, self.o_proj), self.post_norm,
                         a.rms_norm_eps, self.fused)
        gate_up = self._linear("gate_up_proj", x, self.gate_up_proj)
        if self.fused:
            act = fused_cpu.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate).mul_(up)
        return h, self._linear("down_proj", act, self.down_proj)

    def _rope_write_kv(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
        kv: KVCache,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]: q after rotary
        """fused_cpu.rope_write_kv as torch ops (CUDA, float16, layer_ops="torch")."""
        a = self.args
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, a.num_heads, a.head_dim)
        k = k.view(-1, a.num_kv_heads, a.head_dim)
        v = v.reshape(-1, a.num_kv_heads, a.head_dim)
        if q.dtype != cos.dtype:  # bf16 weights on CPU: rotary, attention and KV in float32
            q, k, v = q.to(cos.dtype), k.to(cos.dtype), v.to(cos.dtype)
        kv.write(self.idx, meta.slot_mapping, apply_rotary(k, cos, sin), v)
        return apply_rotary(q, cos, sin)


class LlamaModel:
    def __init__(
        self, args: ModelArgs, weights: dict[str, torch.Tensor], max_positions: int,
        attn_dtype: torch.dtype | None = None, gemm: str = "plain",
        fused_ops: bool = False,
    ) -> None:
        """`attn_dtype`: of rotary, attention and the KV cache (default: the weights').
        `gemm`: the Linear backend of every projection and the lm_head (linear.py); packed,
        a tied lm_head costs a second copy of the embedding, which the lookup reads.
        Packing takes each projection's plain weight out of `weights` before the next one
        is reordered, so that loading peaks at the model's size plus one weight, not twice
        the model. `fused_ops`: norms, rotary, KV write and silu through fused_cpu.py (CPU,
        float32 or bf16 with float32 attention: the caller checks `fused_cpu.usable`)."""
        self.args = args
        self.fused = fused_ops
        self.embed = weights["embed"]  # [vocab, hidden]
        pack = gemm != "plain"
        lm_head = weights.pop("lm_head") if pack else weights["lm_head"]
        self.lm_head = Linear(lm_head, backend=gemm)  # [vocab, hidden]
        del lm_head
        self.norm = weights["norm"]
        self.layers = [DecoderLayer(i, weights, args, gemm, fused_ops)
                       for i in range(args.num_layers)]
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(args))  # [max_positions, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1).to(self.device)
        self.attn_dtype = attn_dtype or self.dtype
        self.cos = emb.cos().to(self.attn_dtype)  # [max_positions, head_dim]
        self.sin = emb.sin().to(self.attn_dtype)
        half = args.head_dim // 2
        # [max_positions, head_dim]: what apply_rotary multiplies the swapped halves by.
        self.signed_sin = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)

    @classmethod
    def load(
        cls, model_dir: Path, device: str, dtype: torch.dtype, max_positions: int | None = None,
        *, args: ModelArgs | None = None, attn_dtype: torch.dtype | None = None,
        gemm: str = "plain", fused_ops: bool = False,
    ) -> LlamaModel:
        """The checkpoint in `model_dir`; `args`: its config.json, when the caller parsed it."""
        args = args or ModelArgs.from_model_dir(model_dir)
        weights = load_weights(model_dir, args, dtype, device)
        return cls(args, weights, max_positions or args.max_position_embeddings, attn_dtype,
                   gemm, fused_ops)

    def set_lora(self, lora: LoraHook | None) -> None:
        for layer in self.layers:
            layer.lora = lora

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        meta: AttentionMetadata,
        kv: KVCache,
    ) -> torch.Tensor:  # [num_tokens, hidden], after the final norm
        h = F.embedding(input_ids, self.embed)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.signed_sin[positions].unsqueeze(1)
        pending = None
        for layer in self.layers:
            h, pending = layer.forward(h, pending, cos, sin, meta, kv)
        return add_rms_norm(h, pending, self.norm, self.args.rms_norm_eps, self.fused)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab]
        return self.lm_head(hidden).float()
