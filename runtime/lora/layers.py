"""LoRA in the model: per-projection slot tables, PEFT weights into them, one add_lora per call.

For every layer and each of the model's four projections the manager keeps

    lora_a[proj]  # [num_layers, num_slices, num_slots, max_rank, in]    (PEFT's lora_A rows)
    lora_b[proj]  # [num_layers, num_slices, num_slots, max_out, max_rank] (PEFT's lora_B)
    scales        # [num_slots] float32: alpha / r, or alpha / sqrt(r) with use_rslora

zero-padded past each adapter's rank and each slice's width, and zero for modules an adapter
does not target, so those contribute nothing. Per step:

    lora.prepare(token_to_slot)            # [num_tokens] int32, -1 = base model; meta built once
    lora.apply(layer, "qkv_proj", x, y)    # y[i] += scales[s] * (x[i] @ A[s].T) @ B[s].T
                                           # for every token i with slot s >= 0, per slice

`active` is False for a step where no token has an adapter: the model then skips `apply`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors

import kernels
from runtime.config import RuntimeConfig
from runtime.lora.cache import AdapterCache
from runtime.lora.store import AdapterLoader, ArtifactFetcher, DiskCache
from runtime.model.weights import ModelArgs
from runtime.types import AdapterRef

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# PEFT module name -> (our fused projection, slice index); see docs/internals.md.
PEFT_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
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


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


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
    (per-module ranks are not supported), a rank above `max_rank`, a non-finite value.
    """
    if not 1 <= ref.rank <= max_rank:
        raise ValueError(f"rank {ref.rank} is outside 1..{max_rank}")
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types on a bad header
        raise ValueError(f"not a readable safetensors file: {exc}") from None
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR_NAME.search(name)
        if match is None or match.group(2) not in PEFT_MODULES:
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
        proj, j = PEFT_MODULES[module]
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
    scale = lora_scale(ref.alpha, ref.rank, ref.use_rslora)
    return LoraWeights(ref.rank, scale, stack_a, stack_b)


class LoraManager:
    """Slot tables of every layer and projection, and the step's token -> slot metadata."""

    def __init__(
        self,
        shapes: LoraShapes,
        num_slots: int,
        max_rank: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        self.shapes = shapes
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.device = torch.device(device)
        self.dtype = dtype
        self.lora_a: dict[str, torch.Tensor] = {}
        self.lora_b: dict[str, torch.Tensor] = {}
        for proj in PROJECTIONS:
            sizes, n = shapes.slice_sizes[proj], shapes.num_layers
            self.lora_a[proj] = torch.zeros(  # [layers, slices, slots, max_rank, in]
                n, len(sizes), num_slots, max_rank, shapes.in_features[proj],
                dtype=dtype, device=self.device,
            )
            self.lora_b[proj] = torch.zeros(  # [layers, slices, slots, max_out, max_rank]
                n, len(sizes), num_slots, max(sizes), max_rank, dtype=dtype, device=self.device
            )
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=self.device)
        self._slice_sizes = {
            p: (list(s) if len(s) > 1 else None) for p, s in shapes.slice_sizes.items()
        }
        self.active = False
        self.meta: kernels.LoraMeta | None = None

    @classmethod
    def for_model(
        cls, args: ModelArgs, num_slots: int, max_rank: int, device: torch.device | str,
        dtype: torch.dtype,
    ) -> LoraManager:
        return cls(LoraShapes.from_args(args), num_slots, max_rank, device, dtype)

    def parse(self, data: bytes, ref: AdapterRef) -> LoraWeights:
        """The loader's parse function for this model (runs in the loader's threads)."""
        pin = self.device.type == "cuda"
        return parse_peft_adapter(data, ref, self.shapes, self.max_rank, self.dtype, pin)

    def set_lora(self, slot: int, weights: LoraWeights) -> None:
        """Copy an adapter into `slot`, zeroing whatever it does not target."""
        rank = weights.rank
        for proj in PROJECTIONS:
            a_tab, b_tab = self.lora_a[proj], self.lora_b[proj]
            if proj not in weights.a:
                a_tab[:, :, slot].zero_()
                b_tab[:, :, slot].zero_()
                continue
            a_tab[:, :, slot, :rank].copy_(weights.a[proj], non_blocking=True)
            b_tab[:, :, slot, :, :rank].copy_(weights.b[proj], non_blocking=True)
            if rank < self.max_rank:
                a_tab[:, :, slot, rank:].zero_()
                b_tab[:, :, slot, :, rank:].zero_()
        self.scales[slot] = weights.scale

    def reset_lora(self, slot: int) -> None:
        for proj in PROJECTIONS:
            self.lora_a[proj][:, :, slot].zero_()
            self.lora_b[proj][:, :, slot].zero_()
        self.scales[slot] = 0.0

    def prepare(self, token_to_slot: torch.Tensor | list[int]) -> None:
        """Build this step's metadata once; `token_to_slot` is [num_tokens], -1 = base."""
        t = torch.as_tensor(token_to_slot, dtype=torch.int32)  # [num_tokens]
        # Decided on the host copy: a step without adapters builds nothing and syncs nothing.
        self.active = bool(t.numel()) and bool((t >= 0).any()) if t.device.type == "cpu" else True
        self.meta = kernels.build_meta(t.to(self.device), self.num_slots) if self.active else None

    def apply(
        self,
        layer_idx: int,
        projection: str,
        x: torch.Tensor,  # [num_tokens, in]
        y: torch.Tensor,  # [num_tokens, sum(slice_sizes)], updated in place
    ) -> None:
        if not self.active or self.meta is None:
            return
        kernels.add_lora(
            y, x, self.lora_a[projection][layer_idx], self.lora_b[projection][layer_idx],
            self.scales, self.meta, slice_sizes=self._slice_sizes[projection],
        )


def build_lora_runtime(
    config: RuntimeConfig, args: ModelArgs, dtype: torch.dtype
) -> tuple[LoraManager, AdapterCache]:
    """The LoRA manager to attach to the model and the cache to give the scheduler.

    Device slots: `max_gpu_adapters`; host tier: `max_host_adapters`; disk tier under
    `adapter_disk_dir` within `adapter_disk_bytes` (none when the dir is unset).
    """
    manager = LoraManager.for_model(
        args, config.max_gpu_adapters, config.max_lora_rank, config.device, dtype
    )
    disk = (
        DiskCache(config.adapter_disk_dir, config.adapter_disk_bytes)
        if config.adapter_disk_dir is not None else None
    )
    fetcher = ArtifactFetcher(config.s3_endpoint_url, s3_region=config.s3_region)
    loader = AdapterLoader(fetcher, manager.parse, disk)
    cache = AdapterCache(config.max_gpu_adapters, config.max_host_adapters, loader,
                         manager.set_lora)
    return manager, cache
