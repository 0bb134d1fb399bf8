"""Which sequences run in the next step, and how many of their tokens. No torch.

Per step: running sequences first (decodes before prefill chunks, so a long prompt cannot
stall anyone's decode), each taking as many uncached tokens as the `max_batch_tokens` budget
leaves (chunked prefill); blocks that run out are won back by preempting the latest running
sequences (recompute: their blocks are freed and they re-prefill later). Then waiting
sequences are admitted while `max_running`, the budget and free blocks allow (continuous
batching). Preempted sequences come back first; otherwise the tenant that has been served
the fewest weighted tokens goes next (virtual token counters, as in VTC: input tokens weigh
1, output tokens `OUTPUT_TOKEN_WEIGHT`; a tenant that was idle is lifted to the lowest active
counter so it cannot bank credit), FIFO within a tenant.

Adapters: a sequence naming one is admitted only once `adapters.try_acquire` gives it a
device slot; others pass it meanwhile, until it has waited `max_adapter_wait_steps`, after
which nothing is admitted behind it until it gets its slot (so a cold adapter cannot starve).

`queue_wait` counts, per request, the seconds from `add` to its first admission (an
autoscaling signal: the queue a new runtime would take from; /stats "queue_wait_seconds").

Prefix cache (`block_manager.py` keeps the blocks, `prefix_hashes.py` names them): on
admission a sequence takes the cached blocks its first full blocks hash to, up to but never
including its last token (that token's logits are what the step must compute), and starts
its prefill after them; `advance` registers each block a step has filled. A preempted
sequence's registered blocks stay cached, so it usually finds its own prefix on readmission.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

from runtime.lora.protocol import AdapterProvider, AdapterUnavailable
from runtime.scheduling.block_manager import BlockManager
from runtime.scheduling.prefix_hashes import BlockHashes, root_hash
from runtime.scheduling.sequence import Sequence, SequenceStatus
from runtime.types import FinishReason

OUTPUT_TOKEN_WEIGHT = 2.0
# Upper bounds (seconds) of the queue-wait histogram: from one step to a long queue.
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WaitHistogram:
    """Cumulative counts per upper bound, as Prometheus histograms keep them."""

    def __init__(self, bounds: tuple[float, ...] = QUEUE_WAIT_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        index = next((i for i, b in enumerate(self.bounds) if seconds <= b), len(self.bounds))
        self.counts[index] += 1
        self.sum += seconds

    def to_dict(self) -> dict[str, object]:
        buckets, cumulative = {}, 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            cumulative += n
            buckets[str(bound)] = cumulative
        buckets["+Inf"] = cumulative + self.counts[-1]
        return {"buckets": buckets, "sum": self.sum, "count": buckets["+Inf"]}


class Scheduler:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_running: int,
        max_batch_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] = (),
        max_adapter_wait_steps: int = 64,
        adapters: AdapterProvider | None = None,
        enable_prefix_caching: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.enable_prefix_caching = enable_prefix_caching
        # tenant -> [prompt tokens looked up, of which found cached], at first admission
        self.prefix_lookups: dict[str, list[int]] = {}
        self.queue_wait = WaitHistogram()
        self.block_manager = BlockManager(num_blocks, block_size)
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_adapter_wait_steps = max_adapter_wait_steps
        self.adapters = adapters
        self.waiting: dict[str, deque[Sequence]] = {}  # tenant -> FIFO; preempted ones first
        self.running: list[Sequence] = []
        self.counters: dict[str, float] = {}  # tenant -> weighted tokens served
        self.num_waiting = 0
        self.num_preemptions = 0
        self._arrivals = 0
        self._by_id: dict[str, Sequence] = {}

    # -- queue management ---------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"duplicate request id {seq.request_id!r}")
        if not self._is_active(seq.tenant):
            # VTC lift: an idle tenant rejoins at the lowest active counter, no banked credit.
            active = [c for t, c in self.counters.items() if self._is_active(t)]
            floor = min(active) if active else 0.0
            self.counters[seq.tenant] = max(self.counters.get(seq.tenant, 0.0), floor)
        seq.arrival = self._arrivals
        seq.queued_at = self.clock()
        if self.enable_prefix_caching and seq.block_hashes is None:
            seq.block_hashes = BlockHashes(root_hash(seq.tenant, seq.adapter),
                                           self.block_manager.block_size)
        self._arrivals += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.setdefault(seq.tenant, deque()).append(seq)
        self.num_waiting += 1
        self._by_id[seq.request_id] = seq

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._by_id)

    def unfinished(self) -> list[Sequence]:
        return list(self._by_id.values())

    def abort(self, request_id: str) -> Sequence | None:
        """Finish the request at once, freeing its blocks and slot; None if unknown or done."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return None
        self.finish(seq, FinishReason.ABORT)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.WAITING:
            self.waiting[seq.tenant].remove(seq)
            self.num_waiting -= 1
        elif seq in self.running:
            self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
        self._by_id.pop(seq.request_id, None)

    def _is_active(self, tenant: str) -> bool:
        return bool(self.waiting.get(tenant)) or any(s.tenant == tenant for s in self.running)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_table)
        seq.num_cached_tokens = 0
        seq.num_registered_blocks = 0
        if seq.slot >= 0 and seq.adapter is not None and self.adapters is not None:
            self.adapters.release(seq.adapter.key)
        seq.slot = -1

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting[seq.tenant].appendleft(seq)
        self.num_waiting += 1

    # -- one step -----------------------------------------------------------------------

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """Return ([(sequence, num_new_tokens)] to run now, sequences that failed here)."""
        budget = self.max_batch_tokens
        scheduled: list[tuple[Sequence, int]] = []
        queue = deque(sorted(self.running, key=lambda s: (not s.is_decode, s.arrival)))
        preempted = False
        while queue and budget > 0:
            seq = queue.popleft()
            n = min(seq.num_uncached_tokens, budget)
            total = seq.num_cached_tokens + n
            while not self.block_manager.can_allocate(seq.block_table, total):
                preempted = True
                if queue:
                    self._preempt(queue.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.allocate(seq.block_table, total)
                scheduled.append((seq, n))
                budget -= n
        failed: list[Sequence] = []
        if not preempted:
            budget = self._admit(budget, scheduled, failed)
        for seq, n in scheduled:
            cost = OUTPUT_TOKEN_WEIGHT if seq.is_decode else float(n)
            self.counters[seq.tenant] = self.counters.get(seq.tenant, 0.0) + cost
        return scheduled, failed

    def _admit(
        self, budget: int, scheduled: list[tuple[Sequence, int]], failed: list[Sequence]
    ) -> int:
        not_ready: set[str] = set()  # adapter keys found loading this step: ask once per step
        passed: list[Sequence] = []  # waiting sequences skipped this step for their adapter
        while budget > 0 and len(self.running) < self.max_running:
            seq = self._next_candidate(passed)
            if seq is None:
                break
            hits = self._prefix_hits(seq)
            num_hit = len(hits) * self.block_manager.block_size
            n = min(seq.num_tokens - num_hit, budget)
            if not self.block_manager.can_admit(hits, num_hit + n):
                break  # wait for blocks rather than let smaller requests overtake forever
            if len(self.running) + min(1 + seq.num_forks, self.max_running) > self.max_running:
                break  # its n choices run side by side once forked: wait for room for them
            if seq.adapter is not None and not self._acquire(seq, not_ready, failed):
                if seq.is_finished:
                    continue
                passed.append(seq)
                if seq.num_waiting_steps >= self.max_adapter_wait_steps:
                    break  # head-of-line: admit nothing behind a starving request
                continue
            self.waiting[seq.tenant].remove(seq)
            self.num_waiting -= 1
            self.block_manager.acquire(hits)
            seq.block_table = hits
            seq.num_registered_blocks = len(hits)
            seq.num_cached_tokens = num_hit
            self.block_manager.allocate(seq.block_table, num_hit + n)
            seq.status = SequenceStatus.RUNNING
            if seq.queued_at is not None:  # its first admission; a preempted one is not new
                self.queue_wait.observe(self.clock() - seq.queued_at)
                seq.queued_at = None
                seq.num_cached_prompt_tokens = num_hit
                if seq.block_hashes is not None:
                    counts = self.prefix_lookups.setdefault(seq.tenant, [0, 0])
                    counts[0] += seq.num_prompt_tokens
                    counts[1] += num_hit
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        for seq in self._all_waiting():
            if seq.adapter is not None:
                seq.num_waiting_steps += 1
        return budget

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """The cached blocks `seq` may start from: full blocks before its last token."""
        if seq.block_hashes is None:
            return []
        num_blocks = (seq.num_tokens - 1) // self.block_manager.block_size
        return self.block_manager.lookup(seq.block_hashes.upto(seq.token_ids, num_blocks))

    def _next_candidate(self, passed: list[Sequence]) -> Sequence | None:
        if any(s.num_waiting_steps >= self.max_adapter_wait_steps for s in passed):
            return None  # a starving request was passed over: admit nothing behind it
        best: Sequence | None = None
        best_key: tuple[int, float, int] | None = None
        for tenant, queue in self.waiting.items():
            for seq in queue:
                if seq in passed:
                    continue
                # Preempted sequences first, then the least-served tenant, then FIFO.
                key = (0 if seq.num_preemptions else 1, self.counters.get(tenant, 0.0), seq.arrival)
                if best_key is None or key < best_key:
                    best, best_key = seq, key
                break  # only the first not-yet-passed sequence of each tenant competes
        return best

    def _acquire(self, seq: Sequence, not_ready: set[str], failed: list[Sequence]) -> bool:
        assert seq.adapter is not None and self.adapters is not None
        if seq.adapter.key in not_ready:
            return False
        try:
            slot = self.adapters.try_acquire(seq.adapter)
        except AdapterUnavailable as exc:
            self.finish(seq, FinishReason.ERROR, exc.message)
            failed.append(seq)
            return False
        if slot is None:
            not_ready.add(seq.adapter.key)
            return False
        seq.slot = slot
        return True

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]] | None:
        """Run `child` from where `parent` is now (its prompt cached, nothing sampled yet),
        sharing the parent's full KV blocks. Returns the (src, dst) blocks whose KV the
        caller copies, or None when there is no room in the running batch, no block for the
        copy or no adapter slot: then the caller queues the child to prefill on its own."""
        if len(self.running) >= self.max_running:
            return None  # n above max_running: the rest wait their turn
        if not self.block_manager.can_fork(parent.num_cached_tokens):
            return None
        if child.adapter is not None and self.adapters is not None:
            try:
                slot = self.adapters.try_acquire(child.adapter)  # pinned by the parent: a hit
            except AdapterUnavailable:
                return None
            if slot is None:
                return None
            child.slot = slot
        child.block_table, copies = self.block_manager.fork(
            parent.block_table, parent.num_cached_tokens)
        child.token_ids = list(parent.token_ids)
        child.num_cached_tokens = parent.num_cached_tokens
        child.num_cached_prompt_tokens = parent.num_cached_prompt_tokens
        if parent.block_hashes is not None:
            # Same tokens so far: the same hashes; the full blocks it shares are registered.
            child.block_hashes = parent.block_hashes.copy()
            child.num_registered_blocks = parent.num_cached_tokens // self.block_manager.block_size
        child.arrival = self._arrivals
        self._arrivals += 1
        child.status = SequenceStatus.RUNNING
        self.running.append(child)
        self._by_id[child.request_id] = child
        return copies

    def _all_waiting(self) -> Iterator[Sequence]:
        for queue in self.waiting.values():
            yield from queue

    def postprocess(self, sampled: list[tuple[Sequence, int]]) -> None:
        """Record the step: `sampled` pairs each sequence that sampled with its new token.

        Call after the forward with the scheduled list already applied through `advance`.
        """
        for seq, token in sampled:
            seq.token_ids.append(token)
            eos = token in self.eos_token_ids and not seq.sampling.ignore_eos
            if eos or token in seq.sampling.stop_token_ids:
                self.finish(seq, FinishReason.STOP)
            elif (
                seq.num_output_tokens >= seq.sampling.max_tokens
                or seq.num_tokens >= self.max_model_len
            ):
                self.finish(seq, FinishReason.LENGTH)

    def advance(self, scheduled: list[tuple[Sequence, int]]) -> list[Sequence]:
        """Mark the step's tokens cached and register the blocks it filled; return the
        sequences that now sample a token."""
        sampling = []
        bm = self.block_manager
        for seq, n in scheduled:
            seq.num_cached_tokens += n
            if seq.block_hashes is not None:
                full = seq.num_cached_tokens // bm.block_size
                if full > seq.num_registered_blocks:
                    hashes = seq.block_hashes.upto(seq.token_ids, full)
                    for i in range(seq.num_registered_blocks, full):
                        bm.register(seq.block_table[i], hashes[i], seq.tenant)
                    seq.num_registered_blocks = full
            if seq.num_cached_tokens == seq.num_tokens:
                sampling.append(seq)
        return sampling

    def prefix_cache_stats(self) -> dict[str, object]:
        """/stats "prefix_cache": what the cache holds and, per tenant, prompt tokens looked
        up at admission, those found cached, and cached blocks evicted."""
        bm = self.block_manager
        tenants = set(self.prefix_lookups) | set(bm.evictions)
        return {
            "enabled": self.enable_prefix_caching,
            "cached_blocks": bm.num_cached_blocks,
            "block_size": bm.block_size,
            "tenants": {
                t: {"queried_tokens": self.prefix_lookups.get(t, [0, 0])[0],
                    "cached_tokens": self.prefix_lookups.get(t, [0, 0])[1],
                    "evicted_blocks": bm.evictions.get(t, 0)}
                for t in sorted(tenants)
            },
        }
