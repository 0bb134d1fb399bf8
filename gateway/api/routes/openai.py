"""OpenAI-compatible tenant API (API.md): /v1/models, /v1/completions, /v1/chat/completions,
and the unauthenticated GET /metrics.

One request: the key (guard) -> resolve the model (cached) -> A/B variant -> rate limit ->
router (which may retry on another runtime before the first token) -> the answer, whole or
as SSE chunks ending `data: [DONE]`. Book-keeping (metrics, the tokens charged to the
tenant, experiment figures, the shadow copy) runs after the answer, in a background task,
so it never delays or changes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.response import Stream

from adapters.views import ResolvedAdapter
from gateway.api.openai_format import (
    DONE,
    ChunkWriter,
    Collected,
    chat_body,
    completion_body,
    error_chunk,
)
from gateway.api.schemas.openai import (
    ChatRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    decode_chat,
    decode_completion,
    message_text,
    stop_list,
)
from gateway.api.schemas.openapi import body_operation
from gateway.auth import require_tenant, tenant_of
from gateway.errors import BadRequest, GatewayError, Unavailable, spec_for
from gateway.inference import experiments as ab
from gateway.services import Services
from runtime.protocol import ErrorEvent, Event, FinishEvent, TokenEvent

_encoder = msgspec.json.Encoder()
logger = logging.getLogger("loragate.gateway.openai")


@dataclass(slots=True)
class Plan:
    """What serves one request, decided before it is sent."""

    tenant: str
    tpm: int | None
    adapter: ResolvedAdapter | None
    experiment: Any  # ExperimentView | None
    variant: str | None
    started: float

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.adapter is not None:
            headers["X-Loragate-Adapter"] = f"{self.adapter.name}@{self.adapter.version}"
        if self.variant is not None:
            headers["X-Loragate-Variant"] = self.variant
        return headers


def _services(request: Request[Any, Any, Any]) -> Services:
    services: Services = request.app.state.services
    return services


def _adapter_body(adapter: ResolvedAdapter | None, tenant: str) -> dict[str, Any] | None:
    if adapter is None:
        return None
    ref = adapter.ref
    return {"key": ref.key, "uri": ref.uri, "rank": ref.rank, "alpha": ref.alpha,
            "target_modules": list(ref.target_modules), "use_rslora": ref.use_rslora,
            "name": f"{tenant}/{adapter.name}@{adapter.version}"}


async def _plan(request: Request[Any, Any, Any], model: str, user: str | None) -> Plan:
    services = _services(request)
    principal = tenant_of(request)
    resolution = await services.resolver.resolve(principal.tenant, model)
    adapter, variant, experiment = resolution.adapter, None, None
    if resolution.kind == "experiment":
        experiment = resolution.experiment
        chosen = ab.assign(experiment, user or request.headers.get("x-user-id"))
        adapter, variant = chosen.resolved, chosen.name
    await services.rate_limiter.admit(principal.tenant, principal.requests_per_minute,
                                      principal.tokens_per_minute)
    return Plan(principal.tenant, principal.tokens_per_minute, adapter, experiment, variant,
                time.perf_counter())


def _runtime_body(plan: Plan, request_id: str, sampling: dict[str, Any],
                  prompt: dict[str, Any]) -> dict[str, Any]:
    return {"request_id": request_id, "tenant": plan.tenant, **prompt, "sampling": sampling,
            "adapter": _adapter_body(plan.adapter, plan.tenant)}


async def _after(services: Services, plan: Plan, body: dict[str, Any], got: Collected,
                 status: int, ttft: float | None) -> None:
    """Book-keeping once the answer is out: metrics, token charge, A/B figures, shadow."""
    total = time.perf_counter() - plan.started
    usage = got.usage()
    adapter = plan.adapter.name if plan.adapter is not None else "base"
    labels = services.metrics.labels(plan.tenant, adapter, plan.variant or "")
    services.metrics.observe(labels, status=status, ttft_s=ttft, total_s=total,
                             tokens_in=usage.prompt_tokens, tokens_out=usage.completion_tokens)
    await services.rate_limiter.charge_tokens(plan.tenant, plan.tpm, usage.total_tokens)
    if plan.experiment is None or plan.variant is None:
        return
    ok = status == 200 and got.error is None
    await services.experiment_stats.record(
        plan.tenant, plan.experiment.name, plan.variant, ok=ok, latency_s=total,
        tokens_in=usage.prompt_tokens, tokens_out=usage.completion_tokens)
    shadow = plan.experiment.shadow
    if ok and shadow is not None and shadow.resolved is not None and ab.sample_shadow(
            shadow.sample_rate):
        shadow_body = {**body, "request_id": f"shadow-{uuid.uuid4().hex}",
                       "adapter": _adapter_body(shadow.resolved, plan.tenant)}
        await services.background.run(plan.tenant, plan.experiment.name, shadow_body, got.output)


def _book(services: Services, *args: Any) -> None:
    services.background.spawn(_after(services, *args))


def _for_tenant(error: ErrorEvent, plan: Plan) -> ErrorEvent:
    """The runtime's error as the tenant may see it.

    An adapter load failure's message is written for operators: it carries the artifact
    store's endpoint URL, bucket, prefix or file path. It goes to the log; the tenant gets a
    fixed sentence naming the adapter and the artifact store instead.
    """
    if error.code != "adapter_load_failed":
        return error
    name = f"{plan.adapter.name}@{plan.adapter.version}" if plan.adapter else "the adapter"
    logger.warning("tenant %s, adapter %s: %s", plan.tenant, name, error.message)
    return ErrorEvent(error.code, f"adapter {name} could not be loaded: its artifact could not "
                      "be fetched from the artifact store or is unusable; try again later")


def _raise_for(error: ErrorEvent) -> None:
    if error.code in ("invalid_request", "prompt_too_long"):
        raise BadRequest(error.message, code=error.code)
    raise Unavailable(error.message, code=error.code, retry_after=1)


async def _serve(request: Request[Any, Any, Any], req: CompletionRequest | ChatRequest,
                 prompt: dict[str, Any], sampling: dict[str, Any], *, chat: bool,
                 want_logprobs: bool) -> Response[Any] | Stream:
    services = _services(request)
    plan = await _plan(request, req.model, req.user)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    body = _runtime_body(plan, request_id, sampling, prompt)
    got = Collected()
    events = services.router.generate(body, plan.adapter.ref.key if plan.adapter else None)
    try:
        first = await anext(events)
    except GatewayError as exc:
        _book(services, plan, body, got, spec_for(exc).status, None)
        raise
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        writer = ChunkWriter(request_id, req.model, chat=chat, logprobs=want_logprobs,
                             token_ids=req.return_token_ids)
        return Stream(_sse(services, plan, body, got, first, events, writer, include_usage),
                      media_type="text/event-stream", headers=plan.headers())
    ttft = None
    try:
        got.add(first)
        async for event in events:
            if ttft is None and isinstance(event, TokenEvent):
                ttft = time.perf_counter() - plan.started
            got.add(event)
        if got.error is not None:
            _raise_for(_for_tenant(got.error, plan))
    except GatewayError as exc:
        _book(services, plan, body, got, spec_for(exc).status, ttft)
        raise
    _book(services, plan, body, got, 200, ttft)
    make = chat_body if chat else completion_body
    answer = make(request_id, req.model, got, logprobs=want_logprobs,
                  token_ids=req.return_token_ids)
    return Response(_encoder.encode(answer), media_type="application/json",
                    headers=plan.headers())


async def _sse(services: Services, plan: Plan, body: dict[str, Any], got: Collected,
               first: Event, events: AsyncIterator[Event], writer: ChunkWriter,
               include_usage: bool) -> AsyncIterator[bytes]:
    ttft = None
    try:
        if writer.chat:
            yield writer.role()

        async def all_events() -> AsyncIterator[Event]:
            yield first
            async for event in events:
                yield event

        async for event in all_events():
            got.add(event)
            if isinstance(event, TokenEvent):
                if ttft is None:
                    ttft = time.perf_counter() - plan.started
                yield writer.token(event)
            elif isinstance(event, FinishEvent):
                yield writer.finish(event.finish_reason)
            elif isinstance(event, ErrorEvent):
                shown = _for_tenant(event, plan)
                yield error_chunk(shown.message, shown.code)
        if include_usage and got.error is None:
            yield writer.usage(got.usage())
        yield DONE
    finally:
        # Runs on a client disconnect too: closing `events` closes the runtime's stream,
        # which aborts the request there.
        await asyncio.shield(events.aclose())  # type: ignore[attr-defined]
        _book(services, plan, body, got, 200, ttft)


# The tenant key as a bearer token, declared so the OpenAPI document says how to call these.
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


@post("/v1/completions", guards=[require_tenant], status_code=200, security=_BEARER,
      operation_class=body_operation(CompletionRequest))
async def completions(request: Request[Any, Any, Any]) -> Response[Any] | Stream:
    req = decode_completion(await request.body())
    prompt: dict[str, Any] = (
        {"prompt": req.prompt} if isinstance(req.prompt, str) else
        {"prompt_token_ids": req.prompt}
    )
    sampling = {"max_tokens": req.max_tokens, "temperature": req.temperature,
                "top_p": req.top_p, "seed": req.seed, "stop": stop_list(req.stop),
                "logprobs": req.logprobs}
    return await _serve(request, req, prompt, sampling, chat=False,
                        want_logprobs=req.logprobs is not None)


@post("/v1/chat/completions", guards=[require_tenant], status_code=200, security=_BEARER,
      operation_class=body_operation(ChatRequest))
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any] | Stream:
    req = decode_chat(await request.body())
    messages = [{"role": m.role, "content": message_text(m)} for m in req.messages]
    sampling = {"max_tokens": req.max_completion_tokens or req.max_tokens or 16,
                "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
                "stop": stop_list(req.stop),
                "logprobs": (req.top_logprobs or 0) if req.logprobs else None}
    return await _serve(request, req, {"messages": messages}, sampling, chat=True,
                        want_logprobs=req.logprobs)


@get("/v1/models", guards=[require_tenant], security=_BEARER)
async def list_models(request: Request[Any, Any, Any]) -> ModelList:
    services = _services(request)
    tenant = tenant_of(request).tenant
    cards = [ModelCard(services.resolver.base_model_id, "loragate")]
    cards += [ModelCard(a.name, tenant) for a in await services.catalog.list_adapters(tenant)]
    cards += [ModelCard(e.name, tenant) for e in await services.catalog.list_experiments(tenant)]
    return ModelList(cards)


@get("/metrics", media_type="text/plain; version=0.0.4; charset=utf-8", include_in_schema=False)
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    return bytes(_services(request).metrics.render())


routes = [completions, chat_completions, list_models, metrics]
