"""One intra-op thread pool per runtime: the engine thread's. Helper threads run on one thread.

Under OpenMP every thread that runs a parallel torch op becomes the master of a team of its
own. A helper thread doing torch work (parsing an adapter, loading the model) beside the
engine thread therefore adds a second team that spins on the same cores, and every small op
of the decode step then pays a futex wake-up: measured on SmolLM2 (2 cores), `index_add_`
on [32, 576] went from ~10 us to 160-290 us once an adapter had loaded, and a decode step at
batch 32 from ~200 to ~380 ms. So helper threads call `single_threaded()` first, and the
engine thread `engine_threads(n)` with the count taken before any helper lowered it.

`torch.set_num_threads` also stores a process-wide count, which any thread adopts at its
first parallel op (torch initializes a thread's count lazily, from that store): hence the
engine thread sets its own explicitly and has torch initialize it at once, so that a helper
lowering the store later cannot reach it. The repository's C++ ops never read that store
(kernels/csrc/omp_parallel.h).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def default_num_threads() -> int:
    """torch's intra-op thread count as it was first asked, before a helper lowered it."""
    return torch.get_num_threads()


def single_threaded() -> None:
    """For a helper thread (a pool initializer): its torch ops run inline, with no team."""
    default_num_threads()  # remember the process's count before lowering it
    torch.set_num_threads(1)


def engine_threads(num_threads: int | None = None) -> int:
    """For the engine thread: `num_threads`, else the process's default; returns it."""
    n = num_threads or default_num_threads()
    torch.set_num_threads(n)
    torch.get_num_threads()  # torch's lazy per-thread init, now, while the store holds n
    return n
