"""Read a Hugging Face Llama-family checkpoint (config.json + safetensors) into our fused layout.

No transformers model is instantiated and nothing is unpickled: safetensors only, single file
or sharded through `model.safetensors.index.json`. q/k/v are fused into `qkv_proj` and
gate/up into `gate_up_proj` (the layout the LoRA layers' slices refer to).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None  # None: full attention over the whole context

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        archs = cfg.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ValueError(f"unsupported architecture {archs}; want {SUPPORTED_ARCHITECTURES}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')!r}")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias is not supported")
        # transformers v5 writes rope_parameters; v4 checkpoints carry rope_theta/rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling {rope_type!r}")
        num_heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        model_type = cfg.get("model_type", "llama")
        window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=int(window) if window else None,
        )

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelArgs:
        with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
            return cls.from_config(json.load(f))


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
        # Shard names come from a file on disk: keep them inside the model directory.
        if any(Path(n).name != n for n in names):
            raise ValueError("shard names in the index must be plain file names")
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir} (pickle checkpoints are refused)")
    return files


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in _shard_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # safe_open is not a mapping: keys() is its API
                tensors[name] = f.get_tensor(name)
    return tensors


def load_weights(
    model_dir: Path, args: ModelArgs, dtype: torch.dtype, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Return our fused weights by name: `embed`, `lm_head`, `norm`, `layers.{i}.{part}`.

    Parts per layer: `input_norm`, `qkv_proj` [q+2kv, hidden], `qkv_bias` (when the model has
    one), `o_proj`, `post_norm`, `gate_up_proj` [2*inter, hidden], `down_proj`.
    """
    raw = _read_tensors(Path(model_dir))

    def take(name: str) -> torch.Tensor:
        try:
            return raw.pop(name)
        except KeyError:
            raise ValueError(f"checkpoint lacks tensor {name}") from None

    out: dict[str, torch.Tensor] = {"embed": take("model.embed_tokens.weight")}
    head = raw.pop("lm_head.weight", None)
    if head is None and not args.tie_word_embeddings:
        raise ValueError("checkpoint lacks lm_head.weight and does not tie embeddings")
    out["lm_head"] = out["embed"] if head is None or args.tie_word_embeddings else head
    out["norm"] = take("model.norm.weight")
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        out[f"layers.{i}.input_norm"] = take(p + "input_layernorm.weight")
        out[f"layers.{i}.post_norm"] = take(p + "post_attention_layernorm.weight")
        out[f"layers.{i}.qkv_proj"] = torch.cat([take(f"{attn}{n}_proj.weight") for n in "qkv"])
        if args.qkv_bias:
            out[f"layers.{i}.qkv_bias"] = torch.cat([take(f"{attn}{n}_proj.bias") for n in "qkv"])
        out[f"layers.{i}.o_proj"] = take(attn + "o_proj.weight")
        out[f"layers.{i}.gate_up_proj"] = torch.cat(
            [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]
        )
        out[f"layers.{i}.down_proj"] = take(p + "mlp.down_proj.weight")
    leftover = [n for n in raw if not n.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"checkpoint has tensors this runtime does not use: {leftover[:5]}")
    _check_shapes(out, args)
    return {k: v.to(device=device, dtype=dtype).contiguous() for k, v in out.items()}


def _check_shapes(w: dict[str, torch.Tensor], a: ModelArgs) -> None:
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    expected = {
        "embed": (a.vocab_size, a.hidden_size),
        "lm_head": (a.vocab_size, a.hidden_size),
        "layers.0.qkv_proj": (q + 2 * kv, a.hidden_size),
        "layers.0.o_proj": (a.hidden_size, q),
        "layers.0.gate_up_proj": (2 * a.intermediate_size, a.hidden_size),
        "layers.0.down_proj": (a.hidden_size, a.intermediate_size),
    }
    for name, shape in expected.items():
        if name in w and tuple(w[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(w[name].shape)}, config says {shape}")
