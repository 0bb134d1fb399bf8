"""Per-sequence sampler inputs as device tensors, one row per live sequence.

A sequence takes a row when it joins (`add`: its prompt's tokens, logit biases, stop ids and
scalars written once) and gives it back when it finishes (`remove`). After each step
`record` adds the sampled tokens to the rows' counts with one `index_put_`, so the sampler
never rebuilds a [batch, vocab] tensor from Python lists. Rows are reused; the pool doubles
when full (preempted sequences keep their rows, so it may outgrow max_running).

Memory: 10 bytes per vocabulary entry per row (counts and bias float32, seen and stop bool);
64 rows of a 49152 vocabulary are 31 MB.
"""

from __future__ import annotations

import torch

from runtime.types import SamplingParams


class SamplerState:
    def __init__(self, vocab_size: int, device: torch.device | str, capacity: int = 8) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.capacity = 0
        self._rows: dict[str, int] = {}
        self._free: list[int] = []
        self._flags: dict[str, tuple[bool, bool, bool, bool]] = {}
        # How many live rows use each control: the sampler skips a control nobody uses.
        self.num_with_repetition = 0
        self.num_with_frequency = 0  # frequency or presence penalty
        self.num_with_bias = 0
        self.num_with_min_tokens = 0
        self._grow(max(capacity, 1))

    def _grow(self, capacity: int) -> None:
        """Reallocate every per-row tensor to `capacity` rows, keeping the rows in use."""
        v, dev, first = self.vocab_size, self.device, self.capacity == 0

        def grown(name: str, *shape: int, dtype: torch.dtype, fill: float = 0) -> torch.Tensor:
            new = torch.full((capacity, *shape), fill, dtype=dtype, device=dev)
            if not first:
                old: torch.Tensor = getattr(self, name)
                new[: old.shape[0]] = old
            return new

        self.counts = grown("counts", v, dtype=torch.float32)  # [rows, vocab] generated counts
        self.bias = grown("bias", v, dtype=torch.float32)  # [rows, vocab] logit_bias
        self.seen = grown("seen", v, dtype=torch.bool)  # [rows, vocab] prompt or generated
        self.stop_mask = grown("stop_mask", v, dtype=torch.bool)  # [rows, vocab] EOS + stop ids
        self.num_generated = grown("num_generated", dtype=torch.int64)  # [rows]
        self.min_tokens = grown("min_tokens", dtype=torch.int64)  # [rows]
        self.frequency = grown("frequency", dtype=torch.float32)  # [rows]
        self.presence = grown("presence", dtype=torch.float32)  # [rows]
        self.repetition = grown("repetition", dtype=torch.float32, fill=1)  # [rows]
        self._free += range(capacity - 1, self.capacity - 1, -1)
        self.capacity = capacity

    def row(self, key: str) -> int:
        return self._rows[key]

    def rows(self, keys: list[str]) -> torch.Tensor:  # [len(keys)] int64
        return torch.tensor([self._rows[k] for k in keys], dtype=torch.int64, device=self.device)

    def add(self, key: str, params: SamplingParams, prompt_ids: list[int],
            eos_ids: tuple[int, ...], generated: list[int] | None = None) -> None:
        """Give `key` a row: prompt tokens (and any already `generated`) written once."""
        if key in self._rows:
            raise ValueError(f"duplicate sampler row {key!r}")
        if not self._free:
            self._grow(self.capacity * 2)
        r = self._free.pop()
        self._rows[key] = r
        dev = self.device
        self.counts[r].zero_()
        self.bias[r].zero_()
        self.seen[r].zero_()
        self.stop_mask[r].zero_()
        self.num_generated[r] = 0
        self.seen[r, torch.tensor(prompt_ids, dtype=torch.int64, device=dev)] = True
        if generated:
            ids = torch.tensor(generated, dtype=torch.int64, device=dev)
            self.counts[r].index_add_(0, ids, torch.ones(len(generated), device=dev))
            self.seen[r, ids] = True
            self.num_generated[r] = len(generated)
        if params.logit_bias:
            ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.int64, device=dev)
            values = torch.tensor([b for _, b in params.logit_bias], device=dev)
            self.bias[r, ids] = values
        stops = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_ids))
        if stops:
            self.stop_mask[r, torch.tensor(stops, dtype=torch.int64, device=dev)] = True
        self.min_tokens[r] = params.min_tokens
        self.frequency[r] = params.frequency_penalty
        self.presence[r] = params.presence_penalty
        self.repetition[r] = params.repetition_penalty
        flags = (params.repetition_penalty != 1.0,
                 params.frequency_penalty != 0.0 or params.presence_penalty != 0.0,
                 bool(params.logit_bias), params.min_tokens > 0)
        self._flags[key] = flags
        self._count(flags, +1)

    def fork(self, parent: str, child: str) -> None:
        """Give `child` a copy of `parent`'s row (n choices share the prompt's state)."""
        if not self._free:
            self._grow(self.capacity * 2)
        src, dst = self._rows[parent], self._free.pop()
        self._rows[child] = dst
        for t in (self.counts, self.bias, self.seen, self.stop_mask, self.num_generated,
                  self.min_tokens, self.frequency, self.presence, self.repetition):
            t[dst] = t[src]
        self._flags[child] = self._flags[parent]
        self._count(self._flags[child], +1)

    def remove(self, key: str) -> None:
        r = self._rows.pop(key, None)
        if r is None:
            return
        self._count(self._flags.pop(key), -1)
        self._free.append(r)

    @property
    def needs_history(self) -> bool:
        """Whether a live row reads its generated tokens (penalties, min_tokens). A row's
        controls are fixed when it joins, and `add` rewrites a row's history whole, so the
        steps in which no live row reads it may skip `record`."""
        return bool(self.num_with_repetition or self.num_with_frequency
                    or self.num_with_min_tokens)

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """rows, tokens: [n] int64; each row sampled its token this step."""
        ones = torch.ones(rows.shape[0], dtype=self.counts.dtype, device=self.device)
        self.counts.index_put_((rows, tokens), ones, accumulate=True)
        self.seen[rows, tokens] = True
        self.num_generated[rows] += 1

    def _count(self, flags: tuple[bool, bool, bool, bool], sign: int) -> None:
        repetition, frequency, bias, min_tokens = flags
        self.num_with_repetition += sign * repetition
        self.num_with_frequency += sign * frequency
        self.num_with_bias += sign * bias
        self.num_with_min_tokens += sign * min_tokens

    def __len__(self) -> int:
        return len(self._rows)
