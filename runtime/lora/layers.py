"""LoRA in the model: per-projection slot tables and one add_lora per projection call.

For every layer and each of the model's four projections the manager keeps

    lora_a[proj]  # [num_layers, num_slices, num_slots, max_rank, in]    (PEFT's lora_A rows)
    lora_b[proj]  # [num_layers, num_slices, num_slots, max_out, max_rank] (PEFT's lora_B)
    scales        # [num_slots] float32: alpha / r, or alpha / sqrt(r) with use_rslora

zero-padded past each adapter's rank and each slice's width, and zero for modules an adapter
does not target, so those contribute nothing. Per step:

    lora.prepare(token_to_slot)            # [num_tokens] int32 (or a list), -1 = base; meta lazy
    lora.apply(layer, "qkv_proj", x, y)    # y[i] += scales[s] * (x[i] @ A[s].T) @ B[s].T
                                           # for every token i with slot s >= 0, per slice

`active` is False for a step where no token has an adapter: the model then skips `apply`.
On the CPU torch path, `prepare` also decides per projection whether the step takes the
dense form (`kernels.add_lora_dense`: one call per projection against the active slots
packed side by side, native on CPU in fp32 and bf16, instead of matmuls per adapter and
slice): when the wasted FLOPs of its torch form (every token against every active adapter)
cost less than the calls it saves. The packs are built once per set of active slots and
reused by every step until that set or a slot changes.
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
        self._meta: kernels.LoraMeta | None = None
        self._token_to_slot: torch.Tensor | None = None  # this step's, while meta is unbuilt
        self._ranks = [0] * num_slots  # host copies, so prepare() never reads the device
        self._scales = [0.0] * num_slots
        # Per slot, the projections its adapter targets and its rank there (host copies too).
        self._targets: list[dict[str, int]] = [{} for _ in range(num_slots)]
        self._version = 0  # bumped by every slot write: packs built before it are stale
        self._dense_ok = kernels.backend(self.device) == "torch"
        self._dense: dict[str, torch.Tensor] = {}  # projection -> this step's mask
        self._idle: set[str] = set()  # projections no active adapter of this step targets
        self._packs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # projection -> (its slots, their largest rank there, _version) its pack was built for
        self._pack_keys: dict[str, tuple[tuple[int, ...], int, int]] = {}

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
        self._ranks[slot], self._scales[slot] = rank, float(self.scales[slot])
        self._targets[slot] = dict.fromkeys(weights.a, rank)
        self._version += 1

    def reset_lora(self, slot: int) -> None:
        for proj in PROJECTIONS:
            self.lora_a[proj][:, :, slot].zero_()
            self.lora_b[proj][:, :, slot].zero_()
        self.scales[slot] = 0.0
        self._ranks[slot], self._scales[slot] = 0, 0.0
        self._targets[slot] = {}
        self._version += 1

    def prepare(self, token_to_slot: torch.Tensor | list[int]) -> None:
        """Take this step's `token_to_slot` ([num_tokens], -1 = base); the segment metadata
        is built once, on first use (a step whose projections all take the dense form never
        builds it: ~10 small ops saved per step)."""
        self._dense, self._idle, self._meta, self._token_to_slot = {}, set(), None, None
        if isinstance(token_to_slot, list):
            # The engine's host list: decided without building a tensor for it first.
            self.active = any(s >= 0 for s in token_to_slot)
            if self.active:
                self._token_to_slot = torch.tensor(token_to_slot, dtype=torch.int32)
                if self._dense_ok:
                    self._choose_dense(token_to_slot)
            return
        t = torch.as_tensor(token_to_slot, dtype=torch.int32)  # [num_tokens]
        # Decided on the host copy: a step without adapters builds nothing and syncs nothing.
        self.active = bool(t.numel()) and bool((t >= 0).any()) if t.device.type == "cpu" else True
        if self.active:
            self._token_to_slot = t
            if self._dense_ok:
                self._choose_dense(t.tolist())

    @property
    def meta(self) -> kernels.LoraMeta | None:
        """This step's segment metadata (None when no token has an adapter)."""
        if self._meta is None and self._token_to_slot is not None:
            self._meta = kernels.build_meta(self._token_to_slot.to(self.device), self.num_slots)
        return self._meta

    @property
    def dense_projections(self) -> frozenset[str]:
        """The projections that take the dense form in this step."""
        return frozenset(self._dense)

    def _choose_dense(self, token_to_slot: list[int]) -> None:
        """Per projection, only the active slots whose adapter targets it, at their largest
        rank there: an adapter on q and v alone adds no columns to the MLP's packs, and an
        r8 adapter beside an r16 one on q and v is not padded to 16 where it is alone."""
        active = sorted({s for s in token_to_slot if s >= 0})
        num_tokens = len(token_to_slot)
        masks: dict[tuple[int, tuple[int, ...], int, tuple[int, ...]], torch.Tensor] = {}
        for proj in PROJECTIONS:
            slots = [s for s in active if proj in self._targets[s]]
            if not slots:
                self._idle.add(proj)  # every table row of this step's slots is zero here
                continue
            rank = max(self._targets[s][proj] for s in slots)
            width = len(slots) * rank
            if width > _DENSE_MAX_WIDTH:
                continue
            own = token_to_slot
            if len(slots) < len(active):  # tokens of adapters not targeting proj: base here
                targeted = set(slots)
                own = [s if s in targeted else -1 for s in token_to_slot]
            sizes = self.shapes.slice_sizes[proj]
            k, n_in, n_out = len(sizes), self.shapes.in_features[proj], sum(sizes)
            num_lora = sum(1 for s in own if s >= 0)
            dense = 2 * num_tokens * width * k * (n_in + n_out)
            needed = 2 * num_lora * rank * (k * n_in + n_out)
            loop_calls = 2 * k * len(slots)
            if dense - needed > loop_calls * _CALL_FLOPS:
                continue
            ranks = tuple(self._targets[s][proj] for s in slots)
            mask_key = (k, tuple(slots), rank, ranks)
            if mask_key not in masks:
                masks[mask_key] = kernels.dense_mask(own, slots, rank, self._scales, k,
                                                     list(ranks))
            self._dense[proj] = masks[mask_key].to(self.device)
            key = (tuple(slots), rank, self._version)
            if self._pack_keys.get(proj) != key:
                self._packs.pop(proj, None)
                self._pack_keys[proj] = key

    def _pack(self, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
        pack = self._packs.get(projection)
        if pack is None:
            slots, rank, _ = self._pack_keys[projection]  # set whenever it is dense
            pack = kernels.pack_dense(
                self.lora_a[projection], self.lora_b[projection], list(slots), rank,
                list(self.shapes.slice_sizes[projection]),
            )
            self._packs[projection] = pack
        return pack

    def apply(
        self,
        layer_idx: int,
        projection: str,
        x: torch.Tensor,  # [num_tokens, in]
        y: torch.Tensor,  # [num_tokens, sum(slice_sizes)], updated in place
    ) -> None:
        if not self.active or projection in self._idle:
            return
        mask = self._dense.get(projection)
        if mask is not None:
            a_pack, b_pack = self._pack(projection)
            kernels.add_lora_dense(y, x, a_pack[layer_idx], b_pack[layer_idx], mask,
                                   self._slice_sizes[projection])
            return
        meta = self.meta
        assert meta is not None  # active implies a token_to_slot to build it from
        kernels.add_lora(
            y, x, self.lora_a[projection][layer_idx], self.lora_b[projection][layer_idx],
            self.scales, meta, slice_sizes=self._slice_sizes[projection],
        )


# The dense form's limits. Width (active slots x their largest rank) caps the packs' memory
# and the zero columns' work: 128 is e.g. 8 adapters at r=16 or 2 at r=64. A call saved is
# worth ~2 MFLOP: on 2 cores one small matmul's dispatch (30-100 us) buys that much GEMM.
_DENSE_MAX_WIDTH = 128
_CALL_FLOPS = 2e6
