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
