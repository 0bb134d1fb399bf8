"""Per-step token -> slot metadata shared by every LoRA layer of one forward.

`build_meta` sorts the step's tokens by adapter slot (stably) so that each slot's tokens form
one contiguous segment; the kernels then run one tile grid per segment (SGMV, as in Punica and
vLLM's Triton LoRA ops). Everything is computed on the device of `token_to_slot` without a
host sync, into tensors that can be preallocated at the maximum batch size, so a captured CUDA
graph can replay with new contents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class LoraMeta:
    """Segments of one step's batch, grouped by slot.

    Tokens with slot `-1` (no adapter) sort after every segment and belong to none.
    """

    token_to_slot: torch.Tensor  # [num_tokens] int32, -1 = no adapter
    sorted_token_ids: torch.Tensor  # [num_tokens] int32, token indices stably sorted by slot
    num_tokens_per_slot: torch.Tensor  # [num_slots] int32
    slot_starts: torch.Tensor  # [num_slots] int32, offset of each slot's segment in sorted order
    active_slots: torch.Tensor  # [num_slots] int32, slots with tokens (ascending), then -1
    num_slots: int
    # Host copy of the segments, filled on first use by the CPU paths and shared by every
    # layer of the step (each `build_meta` returns a fresh meta, so it never goes stale).
    _host_segments: list[tuple[int, int, int]] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.token_to_slot.shape[0])

    @property
    def device(self) -> torch.device:
        return self.token_to_slot.device

    @classmethod
    def empty(cls, max_num_tokens: int, num_slots: int, device: torch.device | str) -> LoraMeta:
        """Preallocate a meta at the maximum batch size, to be refilled by `build_meta(out=)`."""
        def i32(n: int) -> torch.Tensor:
            return torch.empty(n, dtype=torch.int32, device=device)

        return cls(
            token_to_slot=i32(max_num_tokens),
            sorted_token_ids=i32(max_num_tokens),
            num_tokens_per_slot=i32(num_slots),
            slot_starts=i32(num_slots),
            active_slots=i32(num_slots),
            num_slots=num_slots,
        )

    def host_segments(self) -> list[tuple[int, int, int]]:
        """`[(slot, start, count)]` for every active slot, in slot order (one host sync)."""
        if self._host_segments is None:
            counts = self.num_tokens_per_slot.tolist()
            starts = self.slot_starts.tolist()
            self._host_segments = [
                (s, starts[s], c) for s, c in enumerate(counts) if c > 0
            ]
        return self._host_segments


def build_meta(
    token_to_slot: torch.Tensor,  # [num_tokens] int, -1 = no adapter
    num_slots: int,
    *,
    out: LoraMeta | None = None,
) -> LoraMeta:
    """Group a step's tokens by slot.

    sorted_token_ids = stable argsort of token_to_slot with -1 placed last
    num_tokens_per_slot[s] = count(token_to_slot == s)
    slot_starts[s] = sum(num_tokens_per_slot[:s])
    active_slots = [s for s in range(num_slots) if num_tokens_per_slot[s] > 0] + [-1, ...]

    With `out` (from `LoraMeta.empty` on the same device) the result is written into its
    buffers and the returned meta holds views of them sized to this step's `num_tokens`.
    Slot values must lie in [-1, num_slots); this is checked only on CPU, where it is free
    of a device sync.
    """
    if token_to_slot.dim() != 1:
        raise ValueError(f"token_to_slot must be 1-D, got shape {tuple(token_to_slot.shape)}")
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    num_tokens = token_to_slot.shape[0]
    device = token_to_slot.device
    if device.type == "cpu" and num_tokens > 0:
        lo, hi = int(token_to_slot.min()), int(token_to_slot.max())
        if lo < -1 or hi >= num_slots:
            raise ValueError(f"slots must lie in [-1, {num_slots}), got [{lo}, {hi}]")

    # -1 becomes num_slots so that tokens without an adapter sort after every segment.
    key = torch.where(token_to_slot < 0, num_slots, token_to_slot.to(torch.int64))
    sorted_ids = torch.sort(key, stable=True).indices
    # scatter_add rather than bincount, which reads the maximum back to the host on CUDA.
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_slots]
    starts = torch.cumsum(counts, 0) - counts
    # Active slots first, ascending, without nonzero() (which would sync with the host).
    order = torch.sort((counts == 0).to(torch.int8), stable=True).indices
    active = torch.where(counts[order] > 0, order, -1)

    if out is None:
        return LoraMeta(
            token_to_slot=token_to_slot.to(torch.int32),
            sorted_token_ids=sorted_ids.to(torch.int32),
            num_tokens_per_slot=counts.to(torch.int32),
            slot_starts=starts.to(torch.int32),
            active_slots=active.to(torch.int32),
            num_slots=num_slots,
        )
    if out.num_slots != num_slots or out.device != device:
        raise ValueError("preallocated meta has another num_slots or device")
    if num_tokens > out.token_to_slot.shape[0]:
        capacity = out.token_to_slot.shape[0]
        raise ValueError(f"{num_tokens} tokens exceed the preallocated {capacity}")
    out.token_to_slot[:num_tokens].copy_(token_to_slot)
    out.sorted_token_ids[:num_tokens].copy_(sorted_ids)
    out.num_tokens_per_slot.copy_(counts)
    out.slot_starts.copy_(starts)
    out.active_slots.copy_(active)
    return LoraMeta(
        token_to_slot=out.token_to_slot[:num_tokens],
        sorted_token_ids=out.sorted_token_ids[:num_tokens],
        num_tokens_per_slot=out.num_tokens_per_slot,
        slot_starts=out.slot_starts,
        active_slots=out.active_slots,
        num_slots=num_slots,
    )
