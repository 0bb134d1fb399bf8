"""One torch thread pool per runtime: helper threads run torch on one thread, the engine
thread on the process's count, whatever order they start in (runtime/model/threads.py)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch

from runtime.lora.store import AdapterLoader, ArtifactFetcher
from runtime.model.threads import default_num_threads, engine_threads
from runtime.types import AdapterRef

pytestmark = pytest.mark.unit


def in_new_thread(fn):
    result = []
    t = threading.Thread(target=lambda: result.append(fn()))
    t.start()
    t.join()
    return result[0]


def test_adapter_parsing_runs_on_one_torch_thread_and_the_engine_thread_keeps_its_pool(
    tmp_path: Path,
) -> None:
    if default_num_threads() < 2:
        pytest.skip("one core: nothing to tell apart")
    # This thread's own count as the test starts (an earlier test module may have left it
    # lowered on purpose): the load must not change it.
    mine = torch.get_num_threads()
    payload = b"adapter bytes"
    path = tmp_path / "obj"
    path.write_bytes(payload)
    ref = AdapterRef.for_version(hashlib.sha256(payload).hexdigest(), path.as_uri(), rank=4,
                                 alpha=8.0, target_modules=("q_proj",))
    seen: list[int] = []

    def parse(data: bytes, ref: AdapterRef) -> None:
        seen.append(torch.get_num_threads())
        torch.ones(64, 64) @ torch.ones(64, 64)  # torch work, as the real parse does

    loader = AdapterLoader(ArtifactFetcher(), parse)
    try:
        loader.load(ref).result(timeout=30)
    finally:
        loader.shutdown()
    assert seen == [1]
    # The loader lowered torch's default for threads started later: the engine thread sets
    # its own count back explicitly.
    assert in_new_thread(lambda: (engine_threads(), torch.get_num_threads())[1]) == \
        default_num_threads()
    assert torch.get_num_threads() == mine  # this thread was never touched


async def test_the_engine_thread_takes_the_runtimes_thread_count(model_dir: Path) -> None:
    """`loragate runtime --threads N` (RuntimeConfig.num_threads) reaches the engine thread,
    where every step's torch ops run; None keeps the process's default."""
    from runtime.async_engine import AsyncLLMEngine
    from runtime.config import RuntimeConfig
    from runtime.engine import LLMEngine
    from runtime.types import EngineRequest, SamplingParams

    if default_num_threads() < 2:
        pytest.skip("one core: nothing to tell apart")
    engine = LLMEngine(RuntimeConfig(model_dir=model_dir, kv_cache_bytes=4 << 20,
                                     max_gpu_adapters=0))
    seen: list[int] = []
    step = engine.step

    def recording_step():
        seen.append(torch.get_num_threads())
        return step()

    engine.step = recording_step  # type: ignore[method-assign]
    for num_threads, expected in ((1, 1), (None, default_num_threads())):
        seen.clear()
        front = AsyncLLMEngine(engine, num_threads=num_threads)
        await front.start()
        try:
            params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
            outs = [o async for o in front.generate(EngineRequest("r", [1, 5, 9], params))]
        finally:
            await front.shutdown(drain=False)
        assert outs and outs[-1].finished
        assert seen and set(seen) == {expected}


_NATIVE_FIRST_CALLS = """
import threading, torch
from runtime.model.threads import engine_threads
engine_threads(2)  # as the engine thread starts
from kernels import torch_lora
from runtime.model import fused_cpu, paged_attention_cpu
op = paged_attention_cpu.load()
assert fused_cpu.load() and op is not None and torch_lora._native_op() is not None
t = threading.Thread(target=torch.set_num_threads, args=(1,))  # a helper, as the loader does
t.start(); t.join()
h = torch.randn(64, 256)
fused_cpu.add_rms_norm(h, torch.randn(64, 256), torch.ones(256), 1e-6)
fused_cpu.silu_mul(torch.randn(64, 512))
torch_lora.add_lora_dense(torch.zeros(64, 32), torch.randn(64, 16), torch.randn(8, 16),
                          torch.randn(8, 32), torch.ones(64, 8), [32])
q = torch.randn(64, 2, 16)
pool = torch.randn(128, 1, 16)
ints = lambda xs: torch.tensor(xs, dtype=torch.int32)
paged_attention_cpu.paged_attention_cpu(
    op, q, pool, pool, ints([list(range(8))] * 64), ints(range(64)), ints(range(64)),
    ints([100] * 64), torch.empty_like(q), 16, 0.25)
print(torch.get_num_threads())
"""


@pytest.mark.slow
def test_a_helpers_thread_count_never_reaches_this_thread_through_the_native_ops() -> None:
    """The first call of each native op on a thread must not adopt the count a helper set
    (at::parallel_for's lazy init did: kernels/csrc/omp_parallel.h says why), in a fresh
    process so that these really are the first calls."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _NATIVE_FIRST_CALLS], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "2"
