"""Issue 12 inside the runtime: one adapter's fault stays its own.

Each numbered finding has a test that fails on the code before the fix:
1. non-finite activations of one sequence (NaN injected mid-batch; a lora_B of 3e38) stop
   only that sequence; the others' greedy tokens equal their solo runs, now and after;
2. an install that cannot succeed (alpha 1e308) leaves the slot as it was and fails only
   its adapter's requests;
3. two versions with the same bytes and another alpha are two cache entries, each served
   with its own scale (PEFT oracle);
4. artifact URIs outside the configured store are refused before anything is opened.
(The runtime token of finding 4 is in test_runtime_auth.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from runtime.config import RuntimeConfig
from runtime.engine import LLMEngine
from runtime.lora.cache import AdapterCache
from runtime.lora.layers import LoraManager
from runtime.lora.manager import build_lora_runtime
from runtime.lora.peft import LoraWeights
from runtime.lora.protocol import AdapterUnavailable, ArtifactScope, FetchError, LoadResult
from runtime.lora.store import ArtifactFetcher
from runtime.model.weights import ModelArgs
from runtime.protocol import ProtocolError, RequestLimits, output_events
from runtime.types import AdapterRef, EngineRequest, FinishReason, SamplingParams
from tests.support.engine_runs import drain
from tests.support.hostile import HOSTILE_B, crafted_ref

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def args(model_dir: Path) -> ModelArgs:
    return ModelArgs.from_model_dir(model_dir)


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def prompt(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 1000, (n - 1,), generator=gen).tolist()


def tokens_of(outs: list) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def solo(engine: LLMEngine, req: EngineRequest) -> list[int]:
    engine.add_request(EngineRequest(f"solo-{req.request_id}", req.prompt_token_ids,
                                     req.sampling, req.adapter, req.tenant))
    outs = drain(engine)[f"solo-{req.request_id}"]
    assert outs[-1].finish_reason is FinishReason.LENGTH
    return tokens_of(outs)


def assert_pool_finite(engine: LLMEngine) -> None:
    assert torch.isfinite(engine.kv_cache.k).all() and torch.isfinite(engine.kv_cache.v).all()


# --- 1. non-finite activations stop only their sequence -------------------------------------


class ZeroSlot:
    """A test-only AdapterProvider: every adapter sits in slot 0, whose weights are zero, so
    an "adapter" request computes what the base model does until the hook poisons it."""

    def try_acquire(self, ref: AdapterRef) -> int:
        return 0

    def release(self, key: str) -> None:
        pass


def inject_nan_from_step(manager: LoraManager, first_step: int) -> None:
    """From step `first_step` on, every token of slot 0 gets NaN after layer 1's o_proj."""
    state = {"step": 0, "slots": torch.empty(0)}
    prepare, apply = manager.prepare, manager.apply

    def poisoned_prepare(token_to_slot):
        state["step"] += 1
        state["slots"] = torch.as_tensor(token_to_slot)
        prepare(token_to_slot)

    def poisoned_apply(layer_idx, projection, x, y):
        apply(layer_idx, projection, x, y)
        if state["step"] >= first_step and layer_idx == 1 and projection == "o_proj":
            y[state["slots"] == 0] = float("nan")

    manager.prepare = poisoned_prepare  # type: ignore[method-assign]
    manager.apply = poisoned_apply  # type: ignore[method-assign]


def test_nan_injected_into_one_sequence_mid_batch_stops_only_that_sequence(
    model_dir: Path, args: ModelArgs
) -> None:
    config = RuntimeConfig(model_dir=model_dir, kv_cache_bytes=4 << 20, max_lora_rank=8,
                           max_gpu_adapters=1)
    manager = LoraManager.for_model(args, 1, 8, "cpu", torch.float32)
    engine = LLMEngine(config, args=args, lora=manager, adapters=ZeroSlot())
    ref = AdapterRef.for_version("0" * 64, "file:///unused", 4, 8.0, ("q_proj",),
                                 name="acme/x@3")
    # The one to be poisoned comes first and is short: block 0 is its only block, and the
    # old decode padded every shorter context of the batch with block 0's rows.
    poisoned = EngineRequest("poisoned", prompt(5, 1), greedy(), ref, tenant="t")
    others = [EngineRequest(f"other-{n}", prompt(n, n), greedy(), tenant="t")
              for n in (11, 23, 40)]
    alone = {r.request_id: solo(engine, r) for r in others}

    inject_nan_from_step(manager, first_step=3)  # steps 1-2: prefill and a first decode
    for req in (poisoned, *others):
        engine.add_request(req)
    outputs = drain(engine)

    final = outputs["poisoned"][-1]
    assert final.finish_reason is FinishReason.ERROR
    assert final.error == "adapter acme/x@3 produced non-finite activations"
    (event,) = output_events(final, None, 5, 0)
    assert (event.code, event.message) == ("adapter_numerics", final.error)  # type: ignore[union-attr]
    assert 0 < len(tokens_of(outputs["poisoned"])) < MAX_TOKENS  # stopped mid-generation
    for req in others:
        assert outputs[req.request_id][-1].finish_reason is FinishReason.LENGTH
        assert tokens_of(outputs[req.request_id]) == alone[req.request_id], req.request_id
    # Its blocks were zeroed as they were freed: the next owners read nothing of it.
    assert_pool_finite(engine)
    assert engine.scheduler.block_manager.num_free_blocks == engine.kv_cache.num_blocks
    for req in others:
        assert solo(engine, req) == alone[req.request_id]


def store_engine(model_dir: Path, args: ModelArgs, store: Path | None, **overrides) -> LLMEngine:
    settings = {"kv_cache_bytes": 4 << 20, "max_lora_rank": 8, "max_gpu_adapters": 2,
                "max_host_adapters": 4, "artifacts_dir": store, **overrides}
    config = RuntimeConfig(model_dir=model_dir, **settings)
    lora, cache = build_lora_runtime(config, args, torch.float32)
    return LLMEngine(config, args=args, lora=lora, adapters=cache)


def test_a_lora_b_of_3e38_fails_its_own_request_and_nobody_elses(
    model_dir: Path, args: ModelArgs, tmp_path: Path
) -> None:
    store = tmp_path / "artifacts"
    hostile = crafted_ref(store, args, "evil/big@1", b_value=HOSTILE_B, seed=7)
    engine = store_engine(model_dir, args, store)
    try:
        # The hostile request is the longest and first: on the old code the others' decode
        # padding read its inf/NaN rows, and every request after it returned token 0.
        attack = EngineRequest("attack", prompt(40, 2), greedy(), hostile, tenant="evil")
        victims = [EngineRequest(f"victim-{n}", prompt(n, 10 + n), greedy(), tenant="acme")
                   for n in (4, 9, 21)]
        alone = {r.request_id: solo(engine, r) for r in victims}
        wait_in_host_tier(engine, hostile)  # so the attack is admitted first, holding block 0
        for req in (attack, *victims):
            engine.add_request(req)
        outputs = drain(engine)
        final = outputs["attack"][-1]
        assert final.finish_reason is FinishReason.ERROR and final.error_code == "adapter_numerics"
        assert "evil/big@1" in (final.error or "")
        for req in victims:
            assert tokens_of(outputs[req.request_id]) == alone[req.request_id], req.request_id
        assert_pool_finite(engine)
        for req in victims:  # and after it: nothing of the attack stayed in the pool
            assert solo(engine, req) == alone[req.request_id]
    finally:
        engine.adapters.close()  # type: ignore[union-attr]


def wait_in_host_tier(engine: LLMEngine, ref: AdapterRef) -> None:
    cache = engine.adapters
    assert isinstance(cache, AdapterCache)
    cache.prefetch(ref)
    deadline = time.monotonic() + 30
    while ref.key not in cache.host:
        assert time.monotonic() < deadline, "the adapter never loaded"
        with cache._lock:
            cache._collect()
        time.sleep(0.005)


# --- 2. an install is all or nothing -------------------------------------------------------


def test_set_lora_with_a_scale_float32_cannot_hold_leaves_the_slot_untouched(
    args: ModelArgs,
) -> None:
    manager = LoraManager.for_model(args, 2, 8, "cpu", torch.float32)
    n, hidden = args.num_layers, args.hidden_size
    q = args.num_heads * args.head_dim
    kv = args.num_kv_heads * args.head_dim

    def weights(fill: float, scale: float) -> LoraWeights:
        a = {"qkv_proj": torch.full((n, 3, 4, hidden), fill)}
        b = {"qkv_proj": torch.full((n, 3, max(q, kv), 4), fill)}
        return LoraWeights(4, scale, a, b)

    manager.set_lora(1, weights(0.5, 2.0))  # the victim's adapter
    before = {p: (manager.lora_a[p].clone(), manager.lora_b[p].clone()) for p in manager.lora_a}
    scales = manager.scales.clone()
    with pytest.raises(ValueError, match="float32"):
        manager.set_lora(1, weights(9.0, 1e308 / 4))  # alpha 1e308, rank 4
    for proj, (a, b) in before.items():
        assert torch.equal(manager.lora_a[proj], a) and torch.equal(manager.lora_b[proj], b)
    assert torch.equal(manager.scales, scales)


class ImmediateLoader:
    """Loads that are done at once: the weights are whatever the test says."""

    def __init__(self, weights: dict[str, object]) -> None:
        self.weights = weights

    def load(self, ref: AdapterRef) -> Future[LoadResult]:
        future: Future[LoadResult] = Future()
        future.set_result(LoadResult(ref.key, self.weights[ref.key], "store", 0.0, 1))
        return future

    def num_disk_entries(self) -> int | None:
        return None

    def shutdown(self) -> None:
        pass


def test_a_failed_install_fails_only_its_adapter_and_empties_the_slot() -> None:
    victim = AdapterRef.for_version("1" * 64, "file:///v", 4, 8.0, ("q_proj",), name="acme/v@1")
    hostile = AdapterRef.for_version("2" * 64, "file:///h", 4, 1e308, ("q_proj",),
                                     name="evil/h@1")
    installed: dict[int, object] = {}

    def install(slot: int, weights: object) -> None:
        if weights == "bad":
            installed[slot] = "half-written"  # what the old set_lora left behind
            raise ValueError("the scale does not fit float32")
        installed[slot] = weights

    cache = AdapterCache(1, 4, ImmediateLoader({victim.key: "good", hostile.key: "bad"}),
                         install)
    assert cache.try_acquire(victim) is None  # load started
    slot = cache.try_acquire(victim)
    assert slot == 0 and installed[0] == "good"
    cache.release(victim.key)  # idle: the one slot is the hostile adapter's victim
    assert cache.try_acquire(hostile) is None
    with pytest.raises(AdapterUnavailable, match="evil/h@1 could not be installed"):
        cache.try_acquire(hostile)
    # The victim no longer maps to a slot whose weights may be foreign: it is reinstalled.
    assert cache.slots.slot_of(victim.key) is None and cache.slots.slot_of(hostile.key) is None
    assert cache.try_acquire(victim) == 0 and installed[0] == "good"
    with pytest.raises(AdapterUnavailable, match="evil/h@1"):  # remembered, not retried
        cache.try_acquire(hostile)


def test_alpha_1e308_fails_its_requests_while_others_in_flight_finish(
    model_dir: Path, args: ModelArgs, tmp_path: Path
) -> None:
    store = tmp_path / "artifacts"
    good = crafted_ref(store, args, "acme/good@1", seed=3, alpha=16.0)
    huge = crafted_ref(store, args, "evil/alpha@1", seed=4, alpha=1e308)
    engine = store_engine(model_dir, args, store)
    try:
        in_flight = EngineRequest("good", prompt(12, 5), greedy(), good, tenant="acme")
        base = EngineRequest("base", prompt(7, 6), greedy(), tenant="acme")
        alone = {r.request_id: solo(engine, r) for r in (in_flight, base)}
        engine.add_request(in_flight)
        engine.add_request(base)
        outputs: dict[str, list] = {}
        while not outputs.get("good"):  # until the good adapter's request is decoding
            for out in engine.step():
                outputs.setdefault(out.request_id, []).append(out)
        for i in range(3):
            engine.add_request(EngineRequest(f"huge-{i}", prompt(9, 20 + i), greedy(), huge,
                                             tenant="evil"))
        for rid, outs in drain(engine).items():
            outputs.setdefault(rid, []).extend(outs)
        for i in range(3):
            final = outputs[f"huge-{i}"][-1]
            assert final.finish_reason is FinishReason.ERROR and "evil/alpha@1" in final.error
        assert tokens_of(outputs["good"]) == alone["good"]
        assert tokens_of(outputs["base"]) == alone["base"]
    finally:
        engine.adapters.close()  # type: ignore[union-attr]


def test_an_install_that_raises_fails_only_its_adapter_in_the_engine(
    model_dir: Path, args: ModelArgs, tmp_path: Path
) -> None:
    store = tmp_path / "artifacts"
    good = crafted_ref(store, args, "acme/good@1", seed=3)
    cursed = crafted_ref(store, args, "evil/cursed@1", seed=5)
    engine = store_engine(model_dir, args, store)
    cache = engine.adapters
    assert isinstance(cache, AdapterCache)
    set_lora = cache._install

    def install(slot: int, weights: LoraWeights) -> None:
        if weights.a["qkv_proj"].equal(cursed_weights.a["qkv_proj"]):
            raise RuntimeError("device copy failed")  # whatever slips past set_lora's checks
        set_lora(slot, weights)

    try:
        wait_in_host_tier(engine, cursed)
        cursed_weights = cache.host.get(cursed.key)
        cache._install = install
        reqs = [EngineRequest("good", prompt(12, 5), greedy(), good),
                EngineRequest("base", prompt(7, 6), greedy()),
                EngineRequest("cursed", prompt(9, 7), greedy(), cursed)]
        alone = {r.request_id: solo(engine, r) for r in reqs[:2]}
        for req in reqs:
            engine.add_request(req)
        outputs = drain(engine)  # a step that raised would fail them all, or raise here
        assert outputs["cursed"][-1].finish_reason is FinishReason.ERROR
        assert "evil/cursed@1 could not be installed" in outputs["cursed"][-1].error
        assert {r: tokens_of(outputs[r]) for r in alone} == alone
    finally:
        cache.close()


# --- 3. the cache key is the version's identity --------------------------------------------


@pytest.mark.slow
def test_same_bytes_with_another_alpha_is_served_with_its_own_alpha(
    model_dir: Path, args: ModelArgs, tmp_path: Path
) -> None:
    from tests.support.lora_oracle import (
        SPECS,
        adapter_ref,
        load_peft_multi,
        make_peft_adapter,
        peft_greedy,
    )

    spec = SPECS[4]  # q/v, rank 8, alpha 32
    v1_dir, v2_dir = tmp_path / "v1", tmp_path / "v2"
    v1 = make_peft_adapter(model_dir, v1_dir, spec)
    shutil.copytree(v1_dir, v2_dir)
    config_path = v2_dir / "adapter_config.json"
    cfg = json.loads(config_path.read_text())
    cfg["lora_alpha"] = 4.0  # a v2 that "fixes" alpha: the same weights' bytes
    config_path.write_text(json.dumps(cfg))
    v2 = adapter_ref(v2_dir, "acme/a@2")
    assert v1.sha256 == v2.sha256 and v1.key != v2.key

    peft_model = load_peft_multi(model_dir, {"v1": v1_dir, "v2": v2_dir})
    text = prompt(9, 42)
    want = {name: peft_greedy(peft_model, text, name, MAX_TOKENS)[0] for name in ("v1", "v2")}
    assert want["v1"] != want["v2"]  # otherwise the test could not tell the alphas apart

    engine = store_engine(model_dir, args, None)  # PEFT's own folders: unconfined
    try:
        for name, ref in (("v1", v1), ("v2", v2)):
            engine.add_request(EngineRequest(name, text, greedy(), ref))
        outputs = drain(engine)
    finally:
        engine.adapters.close()  # type: ignore[union-attr]
    assert {n: tokens_of(outputs[n]) for n in ("v1", "v2")} == want


# --- 4. artifacts only from the configured store --------------------------------------------


def scope_and_artifact(tmp_path: Path) -> tuple[ArtifactScope, AdapterRef]:
    store = tmp_path / "artifacts"
    sha = hashlib.sha256(b"weights").hexdigest()
    path = store / "sha256" / sha[:2] / sha
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    ref = AdapterRef.for_version(sha, path.resolve().as_uri(), 4, 8.0, ("q_proj",))
    return ArtifactScope.of(store, "bucket", "/tenants/"), ref


def limits(store: ArtifactScope) -> RequestLimits:
    return RequestLimits(max_model_len=64, vocab_size=100, max_lora_rank=8, store=store)


def request_for(ref: AdapterRef) -> EngineRequest:
    return EngineRequest("r", [1, 2], SamplingParams(max_tokens=4), ref)


def test_uris_outside_the_store_are_refused_by_the_wire_check(tmp_path: Path) -> None:
    scope, ref = scope_and_artifact(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link_dir = tmp_path / "artifacts" / "sha256" / "cd"
    link_dir.mkdir()
    os.symlink("/etc/passwd", link_dir / ("cd" * 32))  # inside by name, outside by realpath
    s3_address = f"sha256/{ref.sha256[:2]}/{ref.sha256}"
    refused = [
        "file:///etc/passwd",
        (tmp_path / "artifacts" / ".." / "elsewhere" / ref.sha256).as_uri(),
        (outside / "sha256" / ref.sha256[:2] / ref.sha256).as_uri(),
        # not its own address:
        (tmp_path / "artifacts" / "sha256" / ref.sha256[:2] / ("ef" * 32)).as_uri(),
        f"s3://other/tenants/{s3_address}",
        f"s3://bucket/{s3_address}",  # outside the prefix
        f"s3://bucket/tenants/{s3_address}?versionId=1",
        f"http://bucket/tenants/{s3_address}",
    ]
    for uri in refused:
        with pytest.raises(ProtocolError) as excinfo:
            limits(scope).check(request_for(AdapterRef.for_version(
                ref.sha256, uri, 4, 8.0, ("q_proj",))))
        assert excinfo.value.code in ("adapter_uri_refused", "invalid_request"), uri
    symlinked = AdapterRef.for_version("cd" * 32, (link_dir / ("cd" * 32)).as_uri(), 4, 8.0,
                                       ("q_proj",))
    with pytest.raises(ProtocolError, match="content address"):
        limits(scope).check(request_for(symlinked))
    limits(scope).check(request_for(ref))  # its own content address: accepted
    limits(scope).check(request_for(AdapterRef.for_version(
        ref.sha256, f"s3://bucket/tenants/{s3_address}", 4, 8.0, ("q_proj",))))


def test_the_fetcher_refuses_before_it_opens_anything(tmp_path: Path) -> None:
    scope, ref = scope_and_artifact(tmp_path)
    fetcher = ArtifactFetcher(scope=scope)
    # The old runtime read /etc/passwd into memory and only then saw the hash differ.
    with pytest.raises(FetchError, match="refused") as excinfo:
        fetcher.fetch("file:///etc/passwd", ref.sha256)
    assert not excinfo.value.transient
    assert fetcher.fetch(ref.uri, ref.sha256) == b"weights"


def poison_outside_contexts(engine: LLMEngine) -> None:
    """NaN in every K/V row of every layer but the cached context of a running sequence and
    the blocks of the prefix cache (K/V a later prompt may start from): free blocks, the
    unused rows of each last block, whatever a finished request left uncached."""
    bs = engine.kv_cache.block_size
    keep = torch.zeros(engine.kv_cache.num_blocks * bs, dtype=torch.bool)
    for seq in engine.scheduler.running:
        for p in range(seq.num_cached_tokens):
            keep[seq.block_table[p // bs] * bs + p % bs] = True
    for block in engine.scheduler.block_manager.block_hashes:
        keep[block * bs : (block + 1) * bs] = True
    engine.kv_cache.k[:, ~keep] = float("nan")
    engine.kv_cache.v[:, ~keep] = float("nan")


@pytest.mark.parametrize("attention", ["auto", "gather"])
def test_nan_outside_every_context_changes_no_token(
    model_dir: Path, args: ModelArgs, attention: str
) -> None:
    """Decode reads a sequence's rows only up to its length, through its own block table
    (the CPU kernel under "auto", the gather and SDPA under "gather"): NaN planted before
    every step in all other rows of the pool changes no greedy token."""
    config = RuntimeConfig(model_dir=model_dir, kv_cache_bytes=4 << 20, attention=attention,
                           max_batch_tokens=24)  # 24: chunked prefills over cached context
    engine = LLMEngine(config, args=args)
    assert engine.paged_kernel is (attention == "auto")
    reqs = [EngineRequest(f"r{n}", prompt(n, n), greedy()) for n in (5, 16, 17, 30, 41)]
    alone = {r.request_id: solo(engine, r) for r in reqs}
    for req in reqs:
        engine.add_request(req)
    outputs: dict[str, list] = {}
    for _ in range(200):
        if not engine.has_unfinished():
            break
        poison_outside_contexts(engine)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    for req in reqs:
        assert outputs[req.request_id][-1].finish_reason is FinishReason.LENGTH
        assert tokens_of(outputs[req.request_id]) == alone[req.request_id], req.request_id
