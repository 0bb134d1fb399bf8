"""The oracle: one continuous batch mixing six PEFT adapters and the base model.

Every sampled step's logits are compared with PEFT (fp32, full recompute) within 1e-4, and the
greedy tokens must be identical; then again with two device slots for six adapters in
flight, checking on the cache's event log that no adapter in use was ever evicted; then
with a corrupted artifact and an unreachable store beside healthy requests.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

import msgspec
import pytest
import torch

from runtime.config import RuntimeConfig
from runtime.engine import LLMEngine, build_engine
from runtime.lora.manager import build_lora_runtime
from runtime.model.builtin import ensure_builtin_model
from runtime.model.weights import ModelArgs
from runtime.types import EngineRequest, FinishReason, SamplingParams
from tests.support.lora_oracle import SPECS, load_peft_multi, make_peft_adapter, peft_greedy

pytestmark = pytest.mark.unit
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """Base model, six adapters, and PEFT's greedy answer (tokens, logits) per prompt."""
    root = tmp_path_factory.mktemp("lora-oracle")
    model_dir = ensure_builtin_model(root / "base")
    dirs = {s.name: root / s.name for s in SPECS}
    refs = {s.name: make_peft_adapter(model_dir, dirs[s.name], s) for s in SPECS}
    peft_model = load_peft_multi(model_dir, dirs)
    gen = torch.Generator().manual_seed(11)
    cases = []  # (request_id, adapter name or None, prompt)
    for i, name in enumerate([*refs, None, *refs, None]):
        length = 3 + (i * 7) % 23  # prompts of different lengths, some over the chunk size
        prompt = [1] + torch.randint(3, 1000, (length,), generator=gen).tolist()
        cases.append((f"req-{i}", name, prompt))
    expected = {rid: peft_greedy(peft_model, prompt, name, MAX_TOKENS)
                for rid, name, prompt in cases}
    return model_dir, refs, cases, expected


def make_engine(model_dir: Path, **overrides):
    settings = {"max_running": 8, "max_batch_tokens": 24, "max_lora_rank": 32,
                "max_gpu_adapters": 8, "max_host_adapters": 8, **overrides}
    config = RuntimeConfig(model_dir=model_dir, **settings)
    args = ModelArgs.from_model_dir(model_dir)
    lora, cache = build_lora_runtime(config, args, torch.float32)
    engine = LLMEngine(config, lora=lora, adapters=cache)
    return engine, cache


def run(engine: LLMEngine, cache, requests: list[EngineRequest], admit_every: int = 2):
    """Admit requests a few at a time between steps; collect tokens, logits and errors."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    logits: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in requests}
    finals = {}
    sampling_rows: list = []
    advance, compute_logits = engine.scheduler.advance, engine.model.compute_logits

    def record_advance(scheduled):
        sampling_rows[:] = advance(scheduled)
        return sampling_rows[:]

    def record_logits(hidden):
        out = compute_logits(hidden)
        for seq, row in zip(sampling_rows, out, strict=True):
            logits[seq.request_id].append(row.clone())
        return out

    engine.scheduler.advance = record_advance
    engine.model.compute_logits = record_logits
    pending = list(requests)
    steps = 0
    while pending or engine.has_unfinished():
        if pending and steps % admit_every == 0:
            for req in pending[:3]:
                engine.add_request(req)
            del pending[:3]
        outs = engine.step()
        steps += 1
        for seq in engine.scheduler.running:  # a running request's adapter sits in its slot
            if seq.adapter is not None:
                assert cache.slots.key_of(seq.slot) == seq.adapter.key
        for out in outs:
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                finals[out.request_id] = out
        if not outs and not engine.scheduler.running:
            time.sleep(0.002)  # everything waits on a load: let the loader threads run
        assert steps < 5000, "the engine stopped making progress"
    return tokens, logits, finals


def requests_for(cases, refs) -> list[EngineRequest]:
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [EngineRequest(rid, prompt, sampling, refs[name] if name else None, tenant=f"t{i % 2}")
            for i, (rid, name, prompt) in enumerate(cases)]


def assert_matches_peft(cases, expected, tokens, logits) -> None:
    for rid, name, _ in cases:
        want_tokens, want_logits = expected[rid]
        assert tokens[rid] == want_tokens, f"{rid} ({name or 'base'})"
        assert len(logits[rid]) == MAX_TOKENS
        for step, (got, want) in enumerate(zip(logits[rid], want_logits, strict=True)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0,
                                       msg=f"{rid} ({name or 'base'}) step {step}")


def test_mixed_batch_matches_peft_logits_and_greedy_tokens(world) -> None:
    model_dir, refs, cases, expected = world
    engine, cache = make_engine(model_dir)
    try:
        tokens, logits, finals = run(engine, cache, requests_for(cases, refs))
    finally:
        cache.close()
    assert all(f.finish_reason is FinishReason.LENGTH for f in finals.values())
    assert_matches_peft(cases, expected, tokens, logits)
    # The adapters really were mixed: PEFT's answers differ from the base model's.
    base_like = {tuple(expected[rid][0]) for rid, name, _ in cases if name is None}
    assert len({tuple(expected[rid][0]) for rid, *_ in cases} - base_like) >= len(refs)
    stats = cache.stats()
    assert stats["loads"] == len(refs) and stats["hits"]["store"] == len(refs)


def test_two_slots_for_six_adapters_never_evict_one_in_use(world) -> None:
    model_dir, refs, cases, expected = world
    engine, cache = make_engine(model_dir, max_gpu_adapters=2)
    try:
        tokens, logits, finals = run(engine, cache, requests_for(cases, refs), admit_every=1)
    finally:
        cache.close()
    assert_matches_peft(cases, expected, tokens, logits)
    held: dict[str, int] = {}
    evictions = 0
    for event in cache.events:
        if event.kind == "acquire":
            held[event.key] = held.get(event.key, 0) + 1
        elif event.kind == "release":
            held[event.key] -= 1
        elif event.kind == "evict" and event.tier == "device":
            evictions += 1
            assert held.get(event.key, 0) == 0, f"evicted {event.key} while in use"
    assert evictions >= len(refs) - 2  # six adapters really went through two slots
    assert all(n == 0 for n in held.values())  # every acquire was released
    assert cache.stats()["loads"] == len(refs)  # the host tier held them: no reloads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_artifact_and_unreachable_store_fail_only_their_requests(world, tmp_path) -> None:
    model_dir, refs, cases, expected = world
    good = refs[SPECS[0].name]
    corrupt_file = tmp_path / "corrupt.safetensors"
    corrupt_file.write_bytes(Path(good.uri.removeprefix("file://")).read_bytes()[:-8] + b"\0" * 8)
    corrupt = msgspec.structs.replace(refs[SPECS[1].name], uri=corrupt_file.as_uri(),
                                      name="t/corrupt@1")
    far = msgspec.structs.replace(refs[SPECS[2].name], uri=f"s3://bucket/sha256/{good.key}",
                                  name="t/far@1")
    engine, cache = make_engine(model_dir, s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    healthy = [c for c in cases if c[1] in (None, SPECS[0].name)]
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    broken = [EngineRequest(f"bad-{i}", [1, 5, 9, 20 + i], sampling, ref)
              for i, ref in enumerate([corrupt, far, corrupt, far])]
    try:
        tokens, logits, finals = run(engine, cache, requests_for(healthy, refs) + broken)
    finally:
        cache.close()
    assert_matches_peft(healthy, expected, tokens, logits)
    for req in broken:
        final = finals[req.request_id]
        assert final.finish_reason is FinishReason.ERROR and tokens[req.request_id] == []
        assert final.error.startswith("adapter " + req.adapter.name)
        reason = "sha256 mismatch" if req.adapter is corrupt else "store unreachable"
        assert reason in final.error


def test_build_engine_builds_the_adapter_cache_from_the_config(world, tmp_path) -> None:
    model_dir, refs, cases, expected = world
    rid, name, prompt = next(c for c in cases if c[1] is not None)
    config = RuntimeConfig(model_dir=model_dir, max_gpu_adapters=2, max_host_adapters=2,
                           max_lora_rank=32, adapter_disk_dir=tmp_path / "disk")
    engine = build_engine(config)
    try:
        tokens, logits, _ = run(engine, engine.adapters, requests_for([(rid, name, prompt)], refs))
        stats = engine.stats()["adapters"]
    finally:
        engine.adapters.close()
    assert_matches_peft([(rid, name, prompt)], expected, tokens, logits)
    assert stats["loads"] == 1 and stats["resident"] == {"device": 1, "host": 1, "disk": 1}
    no_lora = build_engine(dataclasses.replace(config, max_gpu_adapters=0))
    with pytest.raises(ValueError, match="serves no adapters"):
        no_lora.add_request(requests_for([(rid, name, prompt)], refs)[0])
