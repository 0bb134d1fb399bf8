"""Isolation at the gateway edge (issue 12, findings 5, 6 and 7).

Over the app in process with a stub runtime process behind (tokens/min, experiment figures),
over the app alone (decoding, names, /schema), and over the inference pipeline with a
scripted router (every exit path settles the reservation; errors before the first token).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar, get
from litestar.testing import AsyncTestClient

from adapters.errors import NotFound
from adapters.views import VariantView
from gateway import errors
from gateway.api.openai_format import for_user
from gateway.api.schemas.openai import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    decode_chat,
    decode_completion,
)
from gateway.auth import TenantPrincipal
from gateway.errors import AdapterUnusable, BadRequest, ModelNotFound, Unavailable
from gateway.inference.experiments import ExperimentStats, pick_variant
from gateway.inference.feedback import AnswerLog
from gateway.inference.metrics import Metrics
from gateway.inference.pipeline import PROMPT_BYTES_PER_TOKEN, Background, Pipeline
from gateway.inference.ratelimit import RateLimiter
from gateway.inference.resolver import MAX_ENTRIES, MAX_MODEL_CHARS, Resolver
from gateway.inference.rollouts import RolloutStats
from gateway.inference.shadow import Shadow
from runtime.protocol import (
    ErrorEvent,
    Event,
    FinishEvent,
    GenerateBody,
    SamplingBody,
    StartEvent,
    TokenEvent,
    Usage,
)
from tests.support.gw_helpers import admin, bearer, create_tenant, upload

pytestmark = pytest.mark.unit


async def limited_tenant(gw: AsyncTestClient[Any], name: str, **limits: int) -> str:
    created = await gw.post("/admin/tenants", json={"name": name, **limits}, headers=admin())
    assert created.status_code == 201, created.text
    key = await gw.post(f"/admin/tenants/{name}/keys", json={}, headers=admin())
    return str(key.json()["key"])


# --- finding 5: tokens per minute ----------------------------------------------------------------


async def test_concurrent_answers_stay_within_tokens_per_minute(gw: AsyncTestClient[Any]) -> None:
    """Five at once on a 100 tokens/min budget: before, every one was admitted (the bucket
    was above zero) and 160 tokens were served; now each reserves its bound first."""
    key = await limited_tenant(gw, "acme", tokens_per_minute=100)
    body = {"model": "builtin", "prompt": "hi", "max_tokens": 30}
    answers = await asyncio.gather(*(
        gw.post("/v1/completions", json=body, headers=bearer(key)) for _ in range(5)))
    served = [a.json()["usage"]["total_tokens"] for a in answers if a.status_code == 200]
    assert served and sum(served) <= 100, served
    refused = [a for a in answers if a.status_code != 200]
    assert refused and all(a.status_code == 429 and "retry-after" in a.headers for a in refused)


async def test_a_request_bigger_than_the_whole_budget_is_429_saying_so(
    gw: AsyncTestClient[Any]
) -> None:
    key = await limited_tenant(gw, "acme", tokens_per_minute=100)
    response = await gw.post("/v1/completions", headers=bearer(key),
                             json={"model": "builtin", "prompt": "hi", "max_tokens": 400})
    assert response.status_code == 429, response.text
    assert "budget of 100 tokens per minute" in response.json()["error"]["message"]
    assert int(response.headers["retry-after"]) >= 1


# --- the pipeline with a scripted router: every exit path settles -------------------------------


class ScriptedRouter:
    """Stands for gateway.inference.router.Router: `script` says how the request goes."""

    def __init__(self, script: str, max_len: int | None = None) -> None:
        self.script = script
        self.max_len = max_len
        self.calls = 0
        self.closed = 0
        self.hang = asyncio.Event()
        self.token_out = asyncio.Event()

    def max_model_len(self) -> int | None:
        return self.max_len

    def cache_figures(self) -> dict[str, Any]:
        return {}

    def load_figures(self) -> dict[str, Any]:
        return {"shed": {}, "runtimes": {}}

    async def generate(self, body: GenerateBody, key: str | None
                       ) -> AsyncGenerator[Event, None]:
        self.calls += 1
        try:
            if self.script == "shed":
                raise Unavailable("every runtime is at its limit", code="overloaded",
                                  retry_after=1)
            if self.script == "refused":
                raise BadRequest("sampling: max_tokens must be between 1 and 64")
            yield StartEvent(4)
            if self.script == "store_down":
                yield ErrorEvent("adapter_load_failed", "adapter acme/a@1 failed to load: store "
                                 "unreachable after 4 attempts: s3://bucket/prefix/abc")
                return
            if self.script == "gone":
                yield ErrorEvent("adapter_load_failed", "adapter acme/a@1 failed to load: "
                                 "artifact not found at /srv/artifacts/abc")
                return
            yield TokenEvent([7], "x", None)
            self.token_out.set()
            if self.script == "hang":
                await self.hang.wait()
            yield FinishEvent("length", Usage(4, 1))
        finally:
            self.closed += 1


class FakeCatalog:
    async def resolve(self, tenant: str, model: str) -> Any:
        raise NotFound(model)


def pipeline_over(router: ScriptedRouter, limiter: RateLimiter) -> tuple[Pipeline, Background]:
    stats = ExperimentStats()
    background = Background()
    resolver = Resolver(FakeCatalog(), "base")
    metrics = Metrics(router.cache_figures, router.load_figures)
    pipeline = Pipeline(resolver, limiter, router, metrics, stats,  # type: ignore[arg-type]
                        Shadow(router, stats), background,  # type: ignore[arg-type]
                        rollout_stats=RolloutStats(),
                        answers=AnswerLog(ttl_s=60, max_entries=100))
    return pipeline, background


async def settled(background: Background) -> None:
    while background._tasks:  # the book-keeping tasks of the answers so far
        await asyncio.gather(*list(background._tasks))


PRINCIPAL = TenantPrincipal("acme", "k1", None, 100)


def body(prompt: str = "hi", max_tokens: int = 50) -> GenerateBody:
    return GenerateBody("r1", prompt=prompt, sampling=SamplingBody(max_tokens=max_tokens))


async def left_in_budget(limiter: RateLimiter) -> float:
    return limiter._local[("acme", "t")].level


@pytest.mark.parametrize("script", ["shed", "refused", "store_down", "gone", "ok", "stream",
                                    "client_gone"])
async def test_every_exit_path_settles_the_reservation(script: str) -> None:
    limiter = RateLimiter()
    router = ScriptedRouter("hang" if script in ("stream", "client_gone") else script)
    pipeline, background = pipeline_over(router, limiter)
    request = body()  # reserves 8 + 2 bytes + 50 = 60
    if script in ("shed", "refused", "store_down", "gone"):
        with pytest.raises(errors.GatewayError):
            await pipeline.send(PRINCIPAL, "base", None, request)
        used = 4 if script in ("store_down", "gone") else 0  # the runtime counted the prompt
    elif script == "ok":
        await (await pipeline.send(PRINCIPAL, "base", None, request)).collect()
        used = 5
    elif script == "stream":
        inference = await pipeline.send(PRINCIPAL, "base", None, request)
        async for event in inference.events():
            if isinstance(event, TokenEvent):
                break  # the client leaves after the first token
        await inference.close()
        used = 5  # the prompt and the one token it carried
    else:
        inference = await pipeline.send(PRINCIPAL, "base", None, request)
        task = asyncio.create_task(inference.collect())
        await router.token_out.wait()
        task.cancel()  # the client of a whole answer goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        used = 5
    await settled(background)
    assert router.closed == router.calls == 1  # the runtime's stream was closed
    assert 100 - used - 1 <= await left_in_budget(limiter) <= 100 - used + 1


# --- finding 7: an error before any token, and errors the user can act on -----------------------


async def test_a_stream_failing_before_its_first_token_raises_the_whole_answers_status() -> None:
    for script, status in (("store_down", 503), ("gone", 500)):
        pipeline, _ = pipeline_over(ScriptedRouter(script), RateLimiter())
        with pytest.raises(errors.GatewayError) as info:
            await pipeline.send(PRINCIPAL, "base", None, body())
        response = errors.to_response(info.value)
        assert response.status_code == status
        error = response.content["error"]  # type: ignore[index]
        assert error["code"] == "adapter_load_failed" and "a@1" not in error["message"]
        assert "s3://" not in error["message"] and "/srv" not in error["message"]
        if status == 503:
            assert isinstance(info.value, Unavailable) and "try again" in error["message"]
            assert response.headers["Retry-After"] == "1"
        else:  # gone for good: no Retry-After inviting a retry that cannot help
            assert isinstance(info.value, AdapterUnusable) and "will not help" in error["message"]
            assert "Retry-After" not in response.headers


def test_an_adapter_with_non_finite_activations_is_a_500_that_invites_no_retry() -> None:
    # The runtime stops such a sequence with `adapter_numerics` (its own weights): a retry would
    # give the same answer, so no 503 and no Retry-After.
    from gateway.inference.pipeline import error_for
    from runtime.protocol import ErrorEvent

    error = error_for(ErrorEvent("adapter_numerics",
                                 "adapter acme/x@3 produced non-finite activations"))
    response = errors.to_response(error)
    assert response.status_code == 500 and "Retry-After" not in response.headers
    assert response.content["error"]["code"] == "adapter_numerics"  # type: ignore[index]


async def test_a_prompt_too_long_by_its_bytes_is_refused_before_any_runtime_sees_it() -> None:
    router = ScriptedRouter("ok", max_len=100)
    limiter = RateLimiter()
    unlimited = TenantPrincipal("acme", "k1", None, None)
    pipeline, _ = pipeline_over(router, limiter)
    with pytest.raises(BadRequest) as info:
        await pipeline.send(PRINCIPAL, "base", None,
                            body("x" * (100 * PROMPT_BYTES_PER_TOKEN + 1), max_tokens=1))
    assert router.calls == 0 and not limiter._local  # no runtime, no budget spent
    assert info.value.code == "prompt_too_long" and info.value.param == "prompt"
    assert "100 tokens" in info.value.message
    chat = GenerateBody("r2", messages=[
        ChatMessage("user", "é" * (50 * PROMPT_BYTES_PER_TOKEN + 1))],  # 2 bytes each
        sampling=SamplingBody(max_tokens=1))
    with pytest.raises(BadRequest) as info:
        await pipeline.send(unlimited, "base", None, chat)
    assert info.value.param == "messages"
    # At the cap it goes through (the runtime counts its tokens).
    at_cap = body("x" * (100 * PROMPT_BYTES_PER_TOKEN), max_tokens=1)
    await (await pipeline.send(unlimited, "base", None, at_cap)).collect()
    assert router.calls == 1


def test_runtime_refusals_name_the_users_field_not_the_wire_bodys() -> None:
    completion = CompletionRequest(model="m", prompt="hi")
    chat = ChatRequest(model="m", messages=[ChatMessage("user", "hi")], max_completion_tokens=9)
    refused = for_user(BadRequest("sampling: max_tokens must be between 1 and 64"), completion)
    assert (refused.message, refused.param) == ("max_tokens must be between 1 and 64",
                                                "max_tokens")
    assert for_user(BadRequest("sampling: max_tokens must be ..."), chat).param == (
        "max_completion_tokens")
    assert for_user(BadRequest("sampling: logprobs must be ..."), chat).param == "top_logprobs"
    ids = for_user(BadRequest("prompt token ids must be between 0 and 99"), completion)
    assert (ids.message, ids.param) == ("prompt: token ids must be between 0 and 99", "prompt")
    wire = for_user(BadRequest("invalid body: Expected `int`, got `float` - at "
                               "`$.prompt_token_ids[0]`"), completion)
    assert wire.param == "prompt" and "prompt_token_ids" not in wire.message
    long_prompt = BadRequest("the prompt has 90 tokens and this model's context holds 64: ...",
                             code="prompt_too_long")
    assert for_user(long_prompt, chat).param == "messages"
    assert for_user(long_prompt, chat).code == "prompt_too_long"
    other = BadRequest("a request with this request_id is running")
    assert for_user(other, completion) is other


async def test_expected_503s_log_one_line_without_a_trace(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    @get("/shed", sync_to_thread=False)
    def shed() -> None:
        raise Unavailable("every runtime is at its limit of requests in flight",
                          code="overloaded", retry_after=1)

    app = Litestar([shed], exception_handlers=errors.EXCEPTION_HANDLERS, logging_config=None)
    with caplog.at_level(logging.INFO, logger="loragate"):
        async with AsyncTestClient(app) as client:
            response = await client.get("/shed")
    assert response.status_code == 503
    records = [r for r in caplog.records if r.name.startswith("loragate")]
    assert len(records) == 1 and records[0].exc_info is None, caplog.text
    assert "Traceback" not in caplog.text and len(caplog.text.strip().splitlines()) == 1


def test_a_temperature_below_1e_5_is_greedy() -> None:
    tiny = decode_completion(b'{"model": "m", "prompt": "x", "temperature": 1e-39}')
    assert tiny.temperature == 0.0
    chat = decode_chat(b'{"model": "m", "messages": [{"role": "user", "content": "x"}],'
                       b' "temperature": 9.9e-6}')
    assert chat.temperature == 0.0
    assert decode_completion(b'{"model": "m", "prompt": "x", "temperature": 1e-5}'
                             ).temperature == 1e-5


def test_huge_experiment_weights_still_split_the_users() -> None:
    variants = [VariantView("a", "x", None, 1e308), VariantView("b", "y", None, 1e308)]
    picked = [pick_variant(variants, bucket).name for bucket in range(0, 10_000, 7)]
    assert 0.45 < picked.count("a") / len(picked) < 0.55
    skewed = [VariantView("a", "x", None, 1e308), VariantView("b", "y", None, 1e304)]
    assert {pick_variant(skewed, bucket).name for bucket in range(10_000)} == {"a", "b"}


# --- finding 6: model names -------------------------------------------------------------------


class CountingCatalog:
    def __init__(self) -> None:
        self.lookups = 0

    async def resolve(self, tenant: str, model: str) -> Any:
        self.lookups += 1
        raise NotFound(model)


async def test_unknown_names_do_not_grow_the_resolver_without_bound() -> None:
    catalog = CountingCatalog()
    resolver = Resolver(catalog, "base")
    for i in range(MAX_ENTRIES + 500):
        with pytest.raises(ModelNotFound):
            await resolver.resolve("acme", f"no-such-model-{i}")
    assert len(resolver._cache) == MAX_ENTRIES
    # The most recent names are the ones kept: a repeat is answered from the cache.
    lookups = catalog.lookups
    with pytest.raises(ModelNotFound):
        await resolver.resolve("acme", f"no-such-model-{MAX_ENTRIES + 499}")
    assert catalog.lookups == lookups


async def test_a_name_longer_than_any_model_is_404_without_a_lookup() -> None:
    catalog = CountingCatalog()
    resolver = Resolver(catalog, "base")
    with pytest.raises(ModelNotFound) as info:
        await resolver.resolve("acme", "m" * (MAX_MODEL_CHARS + 1))
    assert catalog.lookups == 0 and not resolver._cache
    assert len(info.value.message) < 200


async def test_a_huge_model_name_is_not_echoed_whole(client: AsyncTestClient[Any]) -> None:
    key = await create_tenant(client, "acme")
    response = await client.post("/v1/completions", headers=bearer(key),
                                 json={"model": "m" * 100_000, "prompt": "hi"})
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"
    assert len(response.content) < 1000


# --- finding 7: decoding, admin strictness, names, /schema ---------------------------------------


async def test_json_nested_1000_deep_is_400_everywhere(client: AsyncTestClient[Any]) -> None:
    key = await create_tenant(client, "acme")
    deep = b"[" * 1000 + b"]" * 1000
    for path, raw, headers in (
        ("/v1/completions", b'{"model": "builtin", "prompt": ' + deep + b"}", bearer(key)),
        ("/v1/chat/completions", b'{"model": "builtin", "messages": ' + deep + b"}",
         bearer(key)),
        ("/admin/tenants", b'{"name": ' + deep + b"}", admin()),
        ("/admin/tenants/acme/keys", b'{"name": ' + deep + b"}", admin()),
    ):
        response = await client.post(path, content=raw,
                                     headers={**headers, "content-type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"


async def test_admin_bodies_are_as_strict_as_the_tenant_api(client: AsyncTestClient[Any]) -> None:
    for body, param in (({"name": "acme", "requests_per_minute": "10"}, "requests_per_minute"),
                        ({"name": "acme", "tokens_per_minute": 10.0}, "tokens_per_minute"),
                        ({"name": 7}, "name")):
        response = await client.post("/admin/tenants", json=body, headers=admin())
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param
    assert (await client.get("/admin/tenants", headers=admin())).json() == []
    created = await client.post("/admin/tenants", headers=admin(),
                                json={"name": "acme", "requests_per_minute": 10})
    assert created.status_code == 201 and created.json()["requests_per_minute"] == 10
    activate = await client.post("/admin/tenants/acme/adapters/a/activate", headers=admin(),
                                 json={"version": "1"})
    assert activate.status_code == 400 and activate.json()["error"]["param"] == "version"


async def test_an_experiment_may_not_be_named_like_the_base_model(
    client: AsyncTestClient[Any], peft_adapter: Path
) -> None:
    key = await create_tenant(client, "acme")
    assert (await upload(client, "acme", "support", peft_adapter)).status_code == 201
    experiment = {"variants": [{"name": "a", "adapter": "support", "weight": 1}]}
    put = await client.put("/admin/tenants/acme/experiments/builtin", json=experiment,
                           headers=admin())
    assert put.status_code == 409, put.text
    assert "base model" in put.json()["error"]["message"]
    models = await client.get("/v1/models", headers=bearer(key))
    assert [m["id"] for m in models.json()["data"]].count("builtin") == 1


async def test_schema_takes_any_valid_token(client: AsyncTestClient[Any]) -> None:
    key = await create_tenant(client, "acme")
    for path in ("/schema/openapi.json", "/schema"):
        assert (await client.get(path)).status_code == 401
        wrong = await client.get(path, headers=bearer("lg_abcdefgh_" + "x" * 32))
        assert wrong.status_code == 401
    for headers in (admin(), bearer(key)):
        response = await client.get("/schema/openapi.json", headers=headers)
        assert response.status_code == 200 and "/admin/tenants" in response.json()["paths"]


async def test_experiment_figures_start_over_when_it_is_deleted_and_created_again(
    gw: AsyncTestClient[Any], peft_adapter: Path
) -> None:
    key = await create_tenant(gw, "acme")
    assert (await upload(gw, "acme", "support", peft_adapter)).status_code == 201
    experiment = {"variants": [{"name": "a", "adapter": "support", "weight": 1}]}
    path = "/admin/tenants/acme/experiments/ab"
    assert (await gw.put(path, json=experiment, headers=admin())).status_code == 200
    answer = await gw.post("/v1/completions", headers=bearer(key),
                           json={"model": "ab", "prompt": "hi", "max_tokens": 2})
    assert answer.status_code == 200, answer.text

    async def requests_of_a() -> int:
        got = await gw.get(path, headers=admin())
        return int(got.json()["variants"][0]["figures"]["requests"])

    for _ in range(500):  # book-keeping runs after the answer, on the app's own loop
        if await requests_of_a() == 1:
            break
        await asyncio.sleep(0.02)
    assert await requests_of_a() == 1
    assert (await gw.delete(path, headers=admin())).status_code == 204
    assert (await gw.put(path, json=experiment, headers=admin())).status_code == 200
    assert await requests_of_a() == 0
