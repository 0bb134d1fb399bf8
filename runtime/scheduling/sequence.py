"""One request inside the scheduler: its tokens, its KV blocks, its adapter slot. No torch."""

from __future__ import annotations

import enum

from runtime.scheduling.prefix_hashes import BlockHashes
from runtime.types import AdapterRef, EngineRequest, FinishReason, SamplingParams


def choice_key(request_id: str, index: int) -> str:
    """The scheduler's key of choice `index`; the separator is no printable character, so no
    request id on the wire can take it."""
    return request_id if index == 0 else f"{request_id}\x1f{index}"


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One choice of a request. `request_id` is the scheduler's key: the request's own id for
    choice 0, `choice_key(id, index)` for the others; `output_id` is always the request's."""

    def __init__(self, req: EngineRequest, arrival: int, index: int = 0) -> None:
        self.request_id: str = choice_key(req.request_id, index)
        self.output_id: str = req.request_id
        self.index = index  # the choice's index, 0..n-1
        self.num_forks = 0  # choices to fork from this one once its prompt is cached
        self.tenant: str = req.tenant
        self.sampling: SamplingParams = req.sampling
        self.adapter: AdapterRef | None = req.adapter
        self.token_ids: list[int] = list(req.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.arrival = arrival  # admission order: FIFO within a tenant
        self.queued_at: float | None = None  # clock at `Scheduler.add`, until first admitted
        self.status = SequenceStatus.WAITING
        self.num_cached_tokens = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        # Prefix cache: the hashes of its full blocks (None: caching off), how many of its
        # blocks are registered, and the prompt tokens its first admission found cached.
        self.block_hashes: BlockHashes | None = None
        self.num_registered_blocks = 0
        self.num_cached_prompt_tokens = 0
        self.slot = -1  # device adapter slot while running; -1: base model or not acquired
        self.num_waiting_steps = 0  # steps spent waiting on its adapter
        self.num_preemptions = 0
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncached_tokens(self) -> int:
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def is_decode(self) -> bool:
        """Only the last sampled token is missing from the cache."""
        return self.num_output_tokens > 0 and self.num_uncached_tokens == 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"cached={self.num_cached_tokens})"
        )
