"""LoRA in the model: per-projection slot tables and one add_lora per projection call.

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
Which adapter sits in which slot is the cache's business (runtime/lora/cache.py); reading
PEFT files is peft.py's; wiring them together is manager.py's.
"""

from __future__ import annotations

import torch

import kernels
from runtime.lora.peft import LoraShapes, LoraWeights, parse_peft_adapter, slot_scale
from runtime.lora.protocol import PROJECTIONS
from runtime.model.weights import ModelArgs
from runtime.types import AdapterRef


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
        """Copy an adapter into `slot`, zeroing whatever it does not target. All or nothing.

        Everything that can fail is checked before the first write (ValueError): the slot,
        the rank, every stack's shape and dtype, the scale as float32. A failure therefore
        leaves the slot exactly as it was; the copies that follow cannot fail on shapes.
        """
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is outside 0..{self.num_slots - 1}")
        rank = weights.rank
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} is outside 1..{self.max_rank}")
        scale = slot_scale(weights.scale)
        for proj in weights.a:
            if proj not in self.lora_a or proj not in weights.b:
                raise ValueError(f"adapter stacks name an unknown projection {proj!r}")
            a_tab, b_tab = self.lora_a[proj], self.lora_b[proj]
            want_a = (*a_tab.shape[:2], rank, a_tab.shape[-1])
            want_b = (*b_tab.shape[:2], b_tab.shape[3], rank)
            a, b = weights.a[proj], weights.b[proj]
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ValueError(f"{proj}: stacks {tuple(a.shape)} / {tuple(b.shape)} do not "
                                 f"fit the slot tables {want_a} / {want_b}")
            if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
                raise ValueError(f"{proj}: stacks must be floating point")
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
        self.scales[slot] = scale

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
