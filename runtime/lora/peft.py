"""PEFT's adapter_model.safetensors read into the slot layout of runtime/lora/layers.py.

An adapter arrives as bytes (runtime/lora/store.py fetched and verified them) plus its
AdapterRef (rank, alpha, rslora, target modules from the catalog). `parse_peft_adapter`
checks every tensor against the base model and stacks them per fused projection, the shape a
device slot takes in a few copies. Runs in the loader's threads: no device work here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors

from runtime.lora.protocol import LORA_TARGETS
from runtime.model.weights import ModelArgs
from runtime.types import AdapterRef

_TENSOR_NAME = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_(A|B)(?:\.default)?\.weight$"
)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class LoraShapes:
    """The widths the slot tables need, from the base model's config."""

    num_layers: int
    in_features: dict[str, int]  # projection -> input width
    slice_sizes: dict[str, tuple[int, ...]]  # projection -> output width of each slice

    @classmethod
    def from_args(cls, args: ModelArgs) -> LoraShapes:
        q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        hidden, inter = args.hidden_size, args.intermediate_size
        return cls(
            num_layers=args.num_layers,
            in_features={"qkv_proj": hidden, "o_proj": q, "gate_up_proj": hidden,
                         "down_proj": inter},
            slice_sizes={"qkv_proj": (q, kv, kv), "o_proj": (hidden,),
                         "gate_up_proj": (inter, inter), "down_proj": (hidden,)},
        )


@dataclass
class LoraWeights:
    """One adapter on the host, stacked per projection so a slot takes a few copies.

    Projections the adapter does not touch are absent; modules it skips inside a projection
    are zero in the stack. Stacks are at the adapter's own rank, not padded to max_rank.
    """

    rank: int
    scale: float
    # proj -> [num_layers, num_slices, rank, in] and [num_layers, num_slices, max_out, rank]
    a: dict[str, torch.Tensor] = field(repr=False)
    b: dict[str, torch.Tensor] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.a.values(), *self.b.values()))


def parse_peft_adapter(
    data: bytes,
    ref: AdapterRef,
    shapes: LoraShapes,
    max_rank: int,
    dtype: torch.dtype,
    pin_memory: bool = False,
) -> LoraWeights:
    """PEFT's adapter_model.safetensors -> LoraWeights, checked against the base model.

    Raises ValueError naming the first problem: an unknown tensor, a module outside
    `ref.target_modules`, a shape that does not fit the model, a rank other than `ref.rank`
    (per-module ranks are not supported), a rank above `max_rank`, a non-finite value, a
    scale that is not a positive finite float32.
    """
    if not 1 <= ref.rank <= max_rank:
        raise ValueError(f"rank {ref.rank} is outside 1..{max_rank}")
    scale = slot_scale(ref.scale)
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types on a bad header
        raise ValueError(f"not a readable safetensors file: {exc}") from None
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR_NAME.search(name)
        if match is None or match.group(2) not in LORA_TARGETS:
            raise ValueError(f"unsupported tensor {name!r}")
        layer, module, half = int(match.group(1)), match.group(2), match.group(3)
        if module not in ref.target_modules:
            raise ValueError(f"tensor {name!r} targets {module}, not in the adapter's modules")
        if layer >= shapes.num_layers:
            raise ValueError(f"tensor {name!r}: the base model has {shapes.num_layers} layers")
        if tensor.dtype not in _DTYPES or tensor.dim() != 2:
            raise ValueError(f"tensor {name!r}: expected a 2-D float tensor")
        halves.setdefault((layer, module), {})[half] = tensor
    if not halves:
        raise ValueError("the adapter holds no LoRA tensors")
    stack_a: dict[str, torch.Tensor] = {}
    stack_b: dict[str, torch.Tensor] = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"layer {layer} {module}: lora_A and lora_B must come together")
        proj, j = LORA_TARGETS[module]
        a, b = pair["A"], pair["B"]
        sizes = shapes.slice_sizes[proj]
        in_f, out_f = shapes.in_features[proj], sizes[j]
        if a.shape != (ref.rank, in_f) or b.shape != (out_f, ref.rank):
            raise ValueError(
                f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do "
                f"not fit rank {ref.rank}, in {in_f}, out {out_f}"
            )
        if proj not in stack_a:
            n = shapes.num_layers
            stack_a[proj] = torch.zeros(n, len(sizes), ref.rank, in_f, dtype=dtype)
            stack_b[proj] = torch.zeros(n, len(sizes), max(sizes), ref.rank, dtype=dtype)
        stack_a[proj][layer, j].copy_(a)
        stack_b[proj][layer, j, :out_f].copy_(b)
    for proj in stack_a:  # one check per stack: per-module checks cost more than the copies
        if not (torch.isfinite(stack_a[proj]).all() and torch.isfinite(stack_b[proj]).all()):
            raise ValueError(f"{proj}: non-finite values in the adapter")
    if pin_memory:  # page-locked host copies make the copy into a slot asynchronous
        stack_a = {p: t.pin_memory() for p, t in stack_a.items()}
        stack_b = {p: t.pin_memory() for p, t in stack_b.items()}
    return LoraWeights(ref.rank, scale, stack_a, stack_b)


def slot_scale(scale: float) -> float:
    """`scale` as the float32 slot table holds it; ValueError when it is not a positive
    finite float32 (alpha 1e308 overflows it: the table would hold inf)."""
    as_f32 = float(torch.tensor(scale, dtype=torch.float64).to(torch.float32))
    if not (math.isfinite(as_f32) and as_f32 > 0):
        raise ValueError(f"the scale {scale!r} (alpha / r) is not a positive finite float32")
    return as_f32
