"""Structured output (`response_format` json_object / json_schema): token masks from llguidance.

Why llguidance (docs/internals.md, "Structured output"): one abi3 wheel with no Python
dependencies that installs next to torch 2.13 CPU; it reads the HF tokenizer as is; its
Earley parser computes a mask lazily per step (about a millisecond over SmolLM2's 49k
tokens), so a schema costs nothing up front, where outlines-core compiles a whole-vocabulary
index per schema (9 s for a bare `{"type": "object"}` here), and xgrammar drags in
apache-tvm-ffi, triton and pydantic and needs its own compile step.

Per sequence one `LLMatcher`. Masks are filled off the critical path: right after a step
consumes its sampled tokens, `advance` hands every live matcher to llguidance's own thread
pool (Rust, no torch op, no GIL held) on a helper thread, which fills the bitmask rows while
the engine runs the next forward; `allowed` waits for it only when the sampler needs the mask.
The sampler applies it as a [num_seqs, vocab] bool mask in the batched step.

The grammar itself (compact JSON with bounded whitespace) comes from runtime/structured.py;
an answer always parses unless it ended by length.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from runtime.structured import grammar_text
from runtime.types import SamplingParams


class Grammars:
    """The live sequences' matchers and their next-token bitmasks (rows reused, pool grows)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, device: torch.device) -> None:
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.device = device
        self._tokenizer: Any = None  # built on first use: 0.4 s, and most runtimes never need it
        self._executor: Any = None
        self._matchers: dict[str, Any] = {}
        self._rows: dict[str, int] = {}
        self._free: list[int] = []
        self._bitmask = torch.zeros((0, -(-vocab_size // 32)), dtype=torch.int32)
        self._fresh: set[str] = set()  # matchers whose first mask is not filled yet
        self._helper = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self._pending: Future[None] | None = None

    def __len__(self) -> int:
        return len(self._matchers)

    def __contains__(self, key: str) -> bool:
        return key in self._matchers

    def add(self, key: str, params: SamplingParams) -> None:
        grammar = grammar_text(params)
        if grammar is None:
            return
        import llguidance
        import llguidance.hf

        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer,
                                                           n_vocab=self.vocab_size)
            self._executor = llguidance.LLExecutor()
        matcher = llguidance.LLMatcher(self._tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(f"response_format: {matcher.get_error()}")
        if not self._free:
            self._wait()  # the helper may be writing the bitmask we are about to replace
            old = self._bitmask
            grown = torch.zeros((max(8, 2 * old.shape[0]), old.shape[1]), dtype=torch.int32)
            grown[: old.shape[0]] = old
            self._free += range(grown.shape[0] - 1, old.shape[0] - 1, -1)
            self._bitmask = grown
        self._rows[key] = self._free.pop()
        self._matchers[key] = matcher
        self._fresh.add(key)

    def remove(self, key: str) -> None:
        if self._matchers.pop(key, None) is None:
            return
        self._wait()  # its row may be being filled; it must not be reused meanwhile
        self._free.append(self._rows.pop(key))
        self._fresh.discard(key)

    def allowed(self, keys: list[str]) -> torch.Tensor | None:
        """[len(keys), vocab] bool on the device: what each row may sample; None if no row
        of this batch has a grammar."""
        if not any(k in self._matchers for k in keys):
            return None
        self._wait()
        fresh = [(self._matchers[k], self._rows[k]) for k in keys if k in self._fresh]
        if fresh:
            import llguidance.torch as llt

            llt.fill_next_token_bitmask_par(self._executor, fresh, self._bitmask)
            self._fresh.difference_update(keys)
        index = torch.tensor([self._rows.get(k, -1) for k in keys], dtype=torch.int64)
        words = self._bitmask[index.clamp(min=0)]  # [n, vocab / 32] int32
        words[index < 0] = -1  # rows without a grammar allow every token
        bits = torch.arange(32, dtype=torch.int32)
        allowed = ((words[:, :, None] >> bits) & 1).bool().flatten(1)[:, : self.vocab_size]
        return allowed.to(self.device)

    def advance(self, keys: list[str], tokens: list[int]) -> dict[str, str | None]:
        """Feed each grammar row its sampled token; return {key: None (the grammar is
        complete: stop) or an error message} for the rows that must end. Then start filling
        the next masks in the background."""
        ended: dict[str, str | None] = {}
        for key, token in zip(keys, tokens, strict=True):
            matcher = self._matchers.get(key)
            if matcher is None:
                continue
            if not matcher.consume_token(token):
                ended[key] = f"response_format: the grammar refused a token: {matcher.get_error()}"
            elif matcher.is_stopped():
                ended[key] = None
        live = [(m, self._rows[k]) for k, m in self._matchers.items()
                if k not in ended and k not in self._fresh and not m.is_stopped()]
        if live:
            self._pending = self._helper.submit(self._fill, live, self._bitmask)
        return ended

    def _fill(self, matchers: list[tuple[Any, int]], bitmask: torch.Tensor) -> None:
        import llguidance.torch as llt

        llt.fill_next_token_bitmask_par(self._executor, matchers, bitmask)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self._wait()
        self._helper.shutdown(wait=False)
