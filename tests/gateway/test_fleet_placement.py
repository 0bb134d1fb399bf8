"""Placement at fleet size (the properties bench/fleet_sim.py relies on): when runtimes come
and go only their adapters move, and the bounded load holds at every choice."""

from __future__ import annotations

import hashlib
import math

import pytest

from gateway.inference.router import Router, rendezvous_order

pytestmark = pytest.mark.unit
URLS = [f"http://10.0.0.{i}:8100" for i in range(1, 41)]
KEYS = [hashlib.sha256(f"adapter-{i}".encode()).hexdigest() for i in range(2000)]


def test_only_the_adapters_of_a_runtime_that_leaves_move() -> None:
    gone = URLS[7]
    rest = [u for u in URLS if u != gone]
    moved = 0
    for key in KEYS:
        before = rendezvous_order(key, URLS)
        after = rendezvous_order(key, rest)
        assert after == [u for u in before if u != gone]  # the order is kept, minus the leaver
        moved += before[0] == gone
    assert 0 < moved < 2 * len(KEYS) / len(URLS)  # about 1/40 of them, not a reshuffle


def test_a_runtime_that_joins_takes_adapters_for_itself_only() -> None:
    new = "http://10.0.1.1:8100"
    taken = 0
    for key in KEYS:
        before, after = rendezvous_order(key, URLS)[0], rendezvous_order(key, [*URLS, new])[0]
        assert after in (before, new)
        taken += after == new
    assert 0 < taken < 2 * len(KEYS) / len(URLS)


def test_the_bound_holds_at_every_choice_and_a_hot_adapter_spills_over() -> None:
    router = Router(None, URLS, client=object())  # type: ignore[arg-type]
    for state in router.runtimes.values():
        state.healthy = True
    hot = KEYS[0]
    homes = rendezvous_order(hot, URLS)
    chosen = []
    for i in range(1200):
        key = hot if i % 10 == 0 else KEYS[1 + i % 500]  # one request in ten
        total = sum(s.in_flight for s in router.runtimes.values()) + 1
        bound = max(1, math.ceil(router.load_factor * total / len(URLS)))
        (state, *_rest) = router.under_cap(router.candidates(key))
        assert state.in_flight < bound
        state.in_flight += 1  # held, as Router.generate holds it, never released here
        if key == hot:
            chosen.append(state.url)
    # A tenth of the traffic needs about a tenth of the fleet: the hot adapter starts on its
    # first choice and spills over to the next few of its own order, not across the fleet.
    used = {homes.index(url) for url in chosen}
    assert chosen[0] == homes[0] and 2 < len(used) <= 8 and max(used) < 10
    assert max(chosen.count(url) for url in set(chosen)) < len(chosen) / 2
