"""Scheduler unit tests without torch: budgets, chunked prefill, fairness, abort, preemption."""

from __future__ import annotations

from collections import Counter

import pytest

from runtime.lora.protocol import AdapterUnavailable
from runtime.scheduling.scheduler import Scheduler
from runtime.scheduling.sequence import Sequence, SequenceStatus
from runtime.types import AdapterRef, EngineRequest, FinishReason, SamplingParams

TOKEN = 5  # what the fake "model" always samples; not an EOS id
EOS = 2


def make(rid: str, prompt_len: int = 8, max_tokens: int = 4, tenant: str = "t",
         adapter: AdapterRef | None = None) -> Sequence:
    req = EngineRequest(rid, [7] * prompt_len, SamplingParams(max_tokens=max_tokens),
                        adapter=adapter, tenant=tenant)
    return Sequence(req, arrival=0)


def scheduler(**kw) -> Scheduler:
    args = dict(num_blocks=64, block_size=4, max_running=4, max_batch_tokens=32,
                max_model_len=256, eos_token_ids=(EOS,))
    args.update(kw)
    return Scheduler(**args)


def step(s: Scheduler, token: int = TOKEN) -> list[tuple[Sequence, int]]:
    scheduled, _failed = s.schedule()
    assert sum(n for _, n in scheduled) <= s.max_batch_tokens
    assert len(s.running) <= s.max_running
    for seq, _ in scheduled:  # a scheduled sequence always holds the blocks for its tokens
        assert len(seq.block_table) * s.block_manager.block_size >= seq.num_cached_tokens + _
    s.postprocess([(seq, token) for seq in s.advance(scheduled)])
    return scheduled


def run_until_done(s: Scheduler, limit: int = 10_000) -> int:
    for i in range(limit):
        if not s.has_unfinished():
            return i
        step(s)
    raise AssertionError("did not finish")


@pytest.mark.unit
def test_budget_and_chunked_prefill_keep_decodes_going() -> None:
    s = scheduler(max_batch_tokens=16, max_running=4)
    short = [make(f"s{i}", prompt_len=3, max_tokens=30) for i in range(3)]
    for seq in short:
        s.add(seq)
    step(s)  # the three short prompts prefill together
    long = make("long", prompt_len=100, max_tokens=2)
    s.add(long)
    chunks = []
    while long.num_cached_tokens < long.num_prompt_tokens:
        scheduled = dict((seq.request_id, n) for seq, n in step(s))
        # Every short sequence decodes one token in every step while the long prompt prefills.
        assert all(scheduled.get(seq.request_id) == 1 for seq in short)
        chunks.append(scheduled["long"])
    assert sum(chunks) == 100 and max(chunks) == 16 - 3 and len(chunks) > 1
    run_until_done(s)
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


@pytest.mark.unit
def test_finish_on_max_tokens_eos_and_model_length() -> None:
    s = scheduler(max_model_len=12)
    a, b, c = make("a", max_tokens=3), make("b", max_tokens=10), make("c", max_tokens=10)
    for seq in (a, b, c):
        s.add(seq)
    step(s)
    step(s)
    step(s)
    assert a.finish_reason is FinishReason.LENGTH and a.num_output_tokens == 3
    s.postprocess([(b, EOS)])
    assert b.finish_reason is FinishReason.STOP
    run_until_done(s)
    assert c.finish_reason is FinishReason.LENGTH and c.num_tokens == 12


@pytest.mark.unit
def test_abort_frees_blocks_at_once() -> None:
    s = scheduler(max_running=2)
    running, other, waiting = make("r", 30), make("o", 30), make("w", 30)
    for seq in (running, other, waiting):
        s.add(seq)
    step(s)
    held = len(running.block_table)
    assert held > 0 and waiting.status is SequenceStatus.WAITING
    free_before = s.block_manager.num_free_blocks
    assert s.abort("r") is running
    assert running.finish_reason is FinishReason.ABORT and running.block_table == []
    assert s.block_manager.num_free_blocks == free_before + held
    assert s.abort("w") is waiting and s.num_waiting == 0
    assert s.abort("w") is None  # already gone
    run_until_done(s)
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


@pytest.mark.unit
def test_preemption_by_recompute_when_blocks_run_out() -> None:
    # 12 blocks of 4 tokens: four sequences of 8 prompt tokens growing to 24 cannot all fit.
    s = scheduler(num_blocks=12, max_running=4, max_batch_tokens=64)
    seqs = [make(f"p{i}", prompt_len=8, max_tokens=16) for i in range(4)]
    for seq in seqs:
        s.add(seq)
    run_until_done(s)
    assert s.num_preemptions > 0
    assert all(seq.finish_reason is FinishReason.LENGTH for seq in seqs)
    assert all(seq.output_token_ids == [TOKEN] * 16 for seq in seqs)
    assert s.block_manager.num_free_blocks == 12


@pytest.mark.unit
def test_fair_share_between_a_flooding_tenant_and_a_light_one() -> None:
    s = scheduler(max_running=2, max_batch_tokens=64)
    flood = [make(f"a{i}", prompt_len=8, max_tokens=8, tenant="flood") for i in range(40)]
    for seq in flood:
        s.add(seq)
    admitted_order: list[str] = []

    def track() -> None:
        for seq, _ in step(s):
            if seq.request_id not in admitted_order:  # first step it runs in: its admission
                admitted_order.append(seq.request_id)

    for _ in range(3):
        track()
    num_flood_before = len(admitted_order)
    light = [make(f"b{i}", prompt_len=8, max_tokens=8, tenant="light") for i in range(4)]
    for seq in light:
        s.add(seq)
    while s.has_unfinished():
        track()
    # FIFO would admit all 40 flood requests before the first light one; fair share
    # interleaves: all four light requests are in before five more flood requests are.
    last_light = max(admitted_order.index(seq.request_id) for seq in light)
    assert last_light < num_flood_before + 4 + 5, admitted_order[:16]
    assert all(seq.finish_reason is FinishReason.LENGTH for seq in flood + light)


@pytest.mark.unit
def test_idle_tenant_cannot_bank_credit() -> None:
    s = scheduler(max_running=1, max_batch_tokens=64)
    s.add(make("a0", tenant="a", max_tokens=2))
    run_until_done(s)
    s.counters["b"] = 0.0  # b was seen long ago and then went idle
    for i in range(6):
        s.add(make(f"c{i}", tenant="c", max_tokens=2))
    step(s)
    s.add(make("b0", tenant="b", max_tokens=2))
    assert s.counters["b"] >= min(s.counters["c"], s.counters["a"])


class FakeAdapters:
    """Slots for `num_slots` adapters; an adapter needs `load_steps` asks before it is resident."""

    def __init__(self, num_slots: int = 1, load_steps: int = 2, broken: frozenset = frozenset()):
        self.num_slots, self.load_steps, self.broken = num_slots, load_steps, broken
        self.asks: dict[str, int] = {}
        self.pins: dict[str, int] = {}
        self.loaded: set[str] = set()
        self.events: list[tuple[str, str]] = []

    def try_acquire(self, ref: AdapterRef) -> int | None:
        if ref.key in self.broken:
            raise AdapterUnavailable(f"hash mismatch for {ref.key[:8]}")
        if ref.key not in self.loaded:
            pinned = {k for k, n in self.pins.items() if n > 0}
            if len(pinned) >= self.num_slots:
                return None  # every slot is pinned: wait, don't evict
            self.asks[ref.key] = self.asks.get(ref.key, 0) + 1
            if self.asks[ref.key] < self.load_steps:
                return None
            self.loaded = {k for k in self.loaded if k in pinned} | {ref.key}
        self.pins[ref.key] = self.pins.get(ref.key, 0) + 1
        self.events.append(("acquire", ref.key))
        return 0

    def release(self, key: str) -> None:
        assert self.pins.get(key, 0) > 0, "release without acquire"
        self.pins[key] -= 1
        self.events.append(("release", key))


def ref(key: str) -> AdapterRef:
    return AdapterRef(key=key * 64, uri="file:///x", rank=4, alpha=8.0, target_modules=("q_proj",))


@pytest.mark.unit
def test_request_waits_for_its_adapter_without_blocking_others() -> None:
    adapters = FakeAdapters(num_slots=1, load_steps=3)
    s = scheduler(adapters=adapters, max_running=4)
    cold = make("cold", adapter=ref("a"))
    base = [make(f"base{i}") for i in range(3)]
    s.add(cold)
    for seq in base:
        s.add(seq)
    step(s)
    assert cold.status is SequenceStatus.WAITING
    assert all(seq.status is SequenceStatus.RUNNING for seq in base)
    run_until_done(s)
    assert cold.finish_reason is FinishReason.LENGTH
    assert all(n == 0 for n in adapters.pins.values())  # every acquire was released


@pytest.mark.unit
def test_failed_adapter_fails_only_its_requests() -> None:
    adapters = FakeAdapters(broken=frozenset({"b" * 64}))
    s = scheduler(adapters=adapters)
    bad, good = make("bad", adapter=ref("b")), make("good")
    s.add(bad)
    s.add(good)
    _scheduled, failed = s.schedule()
    assert failed == [bad]
    assert bad.finish_reason is FinishReason.ERROR and "hash mismatch" in bad.error
    assert good.status is SequenceStatus.RUNNING


@pytest.mark.unit
def test_cold_adapter_is_not_starved_by_a_stream_of_warm_requests() -> None:
    adapters = FakeAdapters(num_slots=1, load_steps=1)
    s = scheduler(adapters=adapters, max_running=2, max_adapter_wait_steps=5)
    s.add(make("warm0", adapter=ref("w"), max_tokens=6))
    step(s)
    cold = make("cold", adapter=ref("c"), max_tokens=2)
    s.add(cold)
    # Warm requests keep arriving; each pins the only slot, so "cold" can only get in if
    # admission stops behind it once it has waited long enough.
    for i in range(200):
        s.add(make(f"warm{i + 1}", adapter=ref("w"), max_tokens=6))
        step(s)
        if cold.is_finished:
            break
    assert cold.finish_reason is FinishReason.LENGTH
    assert cold.num_waiting_steps <= 5 + 10
    run_until_done(s)
    assert all(n == 0 for n in adapters.pins.values())


@pytest.mark.unit
def test_preemption_and_abort_release_adapter_slots() -> None:
    adapters = FakeAdapters(num_slots=4, load_steps=1)
    s = scheduler(adapters=adapters, num_blocks=8, max_running=4, max_batch_tokens=64)
    seqs = [make(f"x{i}", prompt_len=8, max_tokens=12, adapter=ref("x")) for i in range(3)]
    for seq in seqs:
        s.add(seq)
    step(s)
    s.abort("x0")
    run_until_done(s)
    assert s.num_preemptions > 0
    acquires = sum(1 for e, _ in adapters.events if e == "acquire")
    releases = sum(1 for e, _ in adapters.events if e == "release")
    assert acquires == releases > 3  # re-acquired after each preemption
    assert adapters.pins["x" * 64] == 0


@pytest.mark.unit
def test_random_traffic_keeps_the_books_balanced() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    op = st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12), st.sampled_from("abc")),
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("step")),
    )

    @settings(max_examples=60, deadline=None)
    @given(ops=st.lists(op, max_size=80), num_blocks=st.integers(8, 24),
           budget=st.integers(4, 48), max_running=st.integers(1, 6))
    def check(ops, num_blocks, budget, max_running) -> None:
        s = scheduler(num_blocks=num_blocks, max_batch_tokens=budget, max_running=max_running,
                      max_model_len=num_blocks * 4)
        seqs: list[Sequence] = []
        for o in ops:
            if o[0] == "add":
                seqs.append(make(f"q{len(seqs)}", prompt_len=min(o[1], num_blocks * 4 - 1),
                                 max_tokens=o[2], tenant=o[3]))
                s.add(seqs[-1])
            elif o[0] == "abort" and seqs:
                s.abort(seqs[o[1] % len(seqs)].request_id)
            else:
                step(s)
            # Prompts alike (same tenant) share cached blocks: count each block once, and each
            # holder once in its refcount; no held block is free or evictable.
            bm = s.block_manager
            holders = Counter(b for q in seqs for b in q.block_table)
            assert len(holders) + bm.num_free_blocks == num_blocks
            assert all(bm.ref_counts[b] == n for b, n in holders.items())
            assert not set(holders) & (set(bm.free_blocks) | set(bm.evictable))
            # The per-tenant shares that eviction balances are the evictable blocks, split.
            by_tenant = Counter(bm.block_tenants[b] for b in bm.evictable)
            assert bm.evictable_by_tenant == dict(by_tenant)
            assert all(q.block_table == [] for q in seqs if q.is_finished)
            assert s.num_waiting == sum(len(d) for d in s.waiting.values())
        run_until_done(s)  # whatever happened, everything finishes: no starvation, no deadlock
        assert s.block_manager.num_free_blocks == num_blocks
        for q in seqs:
            assert q.finish_reason in (FinishReason.ABORT, FinishReason.LENGTH)
            if q.finish_reason is FinishReason.LENGTH:
                done = q.num_output_tokens == q.sampling.max_tokens
                assert done or q.num_tokens == s.max_model_len

    check()


@pytest.mark.unit
def test_queue_wait_counts_each_request_once_from_add_to_first_admission() -> None:
    now = [0.0]
    s = scheduler(max_running=1, clock=lambda: now[0])
    first, second = make("a", max_tokens=2), make("b", max_tokens=2)
    s.add(first)
    s.add(second)
    now[0] = 0.003
    step(s)  # "a" runs; "b" waits behind it (max_running=1)
    now[0] = 0.2
    run_until_done(s)
    wait = s.queue_wait.to_dict()
    assert wait["count"] == 2
    assert wait["sum"] == pytest.approx(0.003 + 0.2)
    buckets = wait["buckets"]
    assert (buckets["0.005"], buckets["0.1"], buckets["0.25"], buckets["+Inf"]) == (1, 1, 2, 2)


@pytest.mark.unit
def test_queue_wait_ignores_readmission_after_preemption() -> None:
    s = scheduler(num_blocks=6, block_size=4, max_running=4, clock=lambda: 0.0)
    seqs = [make(f"r{i}", prompt_len=4, max_tokens=12) for i in range(3)]
    for seq in seqs:
        s.add(seq)
    run_until_done(s)
    assert s.num_preemptions > 0
    assert s.queue_wait.to_dict()["count"] == 3
