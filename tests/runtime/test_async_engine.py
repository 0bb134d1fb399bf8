"""AsyncLLMEngine: concurrent streams, early exit aborts, drain on shutdown, step failures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from runtime.async_engine import AsyncLLMEngine, EngineDraining
from runtime.config import RuntimeConfig
from runtime.engine import LLMEngine
from runtime.types import EngineRequest, FinishReason, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
async def front(model_dir: Path):
    engine = LLMEngine(RuntimeConfig(model_dir=model_dir, kv_cache_bytes=4 << 20,
                                     max_gpu_adapters=0))
    front = AsyncLLMEngine(engine)
    await front.start()
    yield front
    await front.shutdown(drain=False)


def req(rid: str, n: int = 8, prompt: tuple[int, ...] = (1, 300, 301, 302)) -> EngineRequest:
    return EngineRequest(rid, list(prompt), SamplingParams(max_tokens=n, temperature=0.0,
                                                           ignore_eos=True))


async def collect(front: AsyncLLMEngine, r: EngineRequest) -> list:
    return [out async for out in front.generate(r)]


@pytest.mark.unit
async def test_concurrent_streams_get_their_solo_tokens(front: AsyncLLMEngine) -> None:
    prompts = [(1, 300 + i, 7, 9 * i + 4) for i in range(6)]
    solo = []
    for i, p in enumerate(prompts):
        solo.append([t for o in await collect(front, req(f"s{i}", 10, p)) for t in o.new_token_ids])
    results = await asyncio.gather(*(collect(front, req(f"c{i}", 10, p))
                                     for i, p in enumerate(prompts)))
    for outs, want in zip(results, solo, strict=True):
        assert [t for o in outs for t in o.new_token_ids] == want
        assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
        assert all(not o.finished for o in outs[:-1])
    stats = front.stats()
    assert stats["tokens_per_s"] > 0 and stats["num_running"] == 0


@pytest.mark.unit
async def test_leaving_the_stream_early_aborts_and_frees_blocks(front: AsyncLLMEngine) -> None:
    seen = 0
    async for _out in front.generate(req("early", 500)):
        seen += 1
        if seen == 3:
            break
    for _ in range(200):  # the worker applies the abort on its next iteration
        if not front.engine.has_unfinished():
            break
        await asyncio.sleep(0.01)
    stats = front.engine.stats()
    assert not front.engine.has_unfinished()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


@pytest.mark.unit
async def test_bad_request_raises_before_streaming(front: AsyncLLMEngine) -> None:
    with pytest.raises(ValueError):
        await collect(front, EngineRequest("bad", [], SamplingParams()))


@pytest.mark.unit
async def test_shutdown_drains_running_requests_and_refuses_new(model_dir: Path) -> None:
    engine = LLMEngine(RuntimeConfig(model_dir=model_dir, kv_cache_bytes=4 << 20,
                                     max_gpu_adapters=0))
    front = AsyncLLMEngine(engine)
    await front.start()
    stream = front.generate(req("inflight", 40))
    outs = [await anext(stream)]  # running now
    shutdown = asyncio.create_task(front.shutdown(drain=True))
    outs += [out async for out in stream]
    await shutdown
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert sum(len(o.new_token_ids) for o in outs) == 40
    with pytest.raises(EngineDraining):
        await collect(front, req("late"))


@pytest.mark.unit
async def test_a_failing_step_errors_the_requests_in_flight_only(front: AsyncLLMEngine) -> None:
    model = front.engine.model
    real_forward = model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real_forward(*args, **kwargs)

    model.forward = flaky
    outs = await collect(front, req("victim", 10))
    assert outs[-1].finish_reason is FinishReason.ERROR and "internal" in outs[-1].error
    model.forward = real_forward
    after = await collect(front, req("after", 4))
    assert after[-1].finish_reason is FinishReason.LENGTH
    stats = front.engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
