"""OpenAI-compatible tenant API (API.md): /v1/models, /v1/completions, /v1/chat/completions.

Each handler decodes the request, hands it to the inference pipeline
(gateway/inference/pipeline.py: resolve, assign, limit, route, book) and writes the answer,
whole or as SSE chunks ending `data: [DONE]`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath
from litestar.response import Stream

from gateway.api.openai_format import (
    DONE,
    ChunkWriter,
    chat_body,
    chat_input,
    completion_body,
    completion_input,
    error_chunk,
    for_user,
    usage_of,
)
from gateway.api.schemas.openai import (
    ChatRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    decode_chat,
    decode_completion,
)
from gateway.api.schemas.openapi import body_operation
from gateway.auth import require_tenant, tenant_of
from gateway.errors import BadRequest
from gateway.inference.pipeline import Inference
from gateway.inference.resolver import model_not_found
from gateway.inference.runtime_client import Collected
from gateway.services import Services
from runtime.protocol import ErrorEvent, FinishEvent, GenerateBody, TokenEvent

_encoder = msgspec.json.Encoder()


def _services(request: Request[Any, Any, Any]) -> Services:
    services: Services = request.app.state.services
    return services


async def _send(request: Request[Any, Any, Any], req: CompletionRequest | ChatRequest,
                body: GenerateBody) -> Inference:
    # The A/B identity: the request's `user`, else the X-User-Id header (API.md).
    user = req.user or request.headers.get("x-user-id")
    try:
        return await _services(request).pipeline.send(tenant_of(request), req.model, user, body)
    except BadRequest as exc:
        raise for_user(exc, req) from None


async def _collect(inference: Inference, req: CompletionRequest | ChatRequest) -> Collected:
    try:
        return await inference.collect()
    except BadRequest as exc:
        raise for_user(exc, req) from None


def _stream(inference: Inference, writer: ChunkWriter, include_usage: bool) -> Stream:
    return Stream(_sse(inference, writer, include_usage), media_type="text/event-stream",
                  headers=inference.plan.headers())


async def _sse(inference: Inference, writer: ChunkWriter,
               include_usage: bool) -> AsyncIterator[bytes]:
    try:
        if writer.chat:
            yield writer.role()
        async for event in inference.events():
            if isinstance(event, TokenEvent):
                yield writer.token(event)
            elif isinstance(event, FinishEvent):
                yield writer.finish(event.finish_reason, event.index)
            elif isinstance(event, ErrorEvent):
                yield error_chunk(event.message, event.code)
        if include_usage and inference.got.error is None:
            yield writer.usage(usage_of(inference.got))
        yield DONE
    finally:
        # Runs on a client disconnect too: the runtime aborts the request.
        await inference.close()


def _whole(answer: Any, inference: Inference) -> Response[Any]:
    return Response(_encoder.encode(answer), media_type="application/json",
                    headers=inference.plan.headers())


def _include_usage(req: CompletionRequest | ChatRequest) -> bool:
    return req.stream_options is not None and bool(req.stream_options.include_usage)


# The tenant key as a bearer token, declared so the OpenAPI document says how to call these.
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


@post("/v1/completions", guards=[require_tenant], status_code=200, security=_BEARER,
      operation_class=body_operation(CompletionRequest))
async def completions(request: Request[Any, Any, Any]) -> Response[Any] | Stream:
    req = decode_completion(await request.body())
    request_id = f"cmpl-{uuid.uuid4().hex}"
    inference = await _send(request, req, completion_input(req, request_id))
    logprobs = req.logprobs is not None
    token_ids, n = bool(req.return_token_ids), inference.body.sampling.n
    if req.stream:
        writer = ChunkWriter(request_id, req.model, chat=False, logprobs=logprobs,
                             token_ids=token_ids, n=n)
        return _stream(inference, writer, _include_usage(req))
    got = await _collect(inference, req)
    return _whole(completion_body(request_id, req.model, got, logprobs=logprobs,
                                  token_ids=token_ids, n=n), inference)


@post("/v1/chat/completions", guards=[require_tenant], status_code=200, security=_BEARER,
      operation_class=body_operation(ChatRequest))
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any] | Stream:
    req = decode_chat(await request.body())
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    inference = await _send(request, req, chat_input(req, request_id))
    logprobs, token_ids = bool(req.logprobs), bool(req.return_token_ids)
    n = inference.body.sampling.n
    if req.stream:
        writer = ChunkWriter(request_id, req.model, chat=True, logprobs=logprobs,
                             token_ids=token_ids, n=n)
        return _stream(inference, writer, _include_usage(req))
    got = await _collect(inference, req)
    return _whole(chat_body(request_id, req.model, got, logprobs=logprobs,
                            token_ids=token_ids, n=n), inference)


async def _model_cards(request: Request[Any, Any, Any]) -> list[ModelCard]:
    services = _services(request)
    tenant = tenant_of(request).tenant
    cards = [ModelCard(services.resolver.base_model_id, "loragate")]
    cards += [ModelCard(a.name, tenant) for a in await services.catalog.list_adapters(tenant)]
    cards += [ModelCard(e.name, tenant) for e in await services.catalog.list_experiments(tenant)]
    return cards


@get("/v1/models", guards=[require_tenant], security=_BEARER)
async def list_models(request: Request[Any, Any, Any]) -> ModelList:
    return ModelList(await _model_cards(request))


@get("/v1/models/{model_id:str}", guards=[require_tenant], security=_BEARER)
async def retrieve_model(request: Request[Any, Any, Any], model_id: FromPath[str]) -> ModelCard:
    # One of the cards /v1/models lists to this tenant, else 404: never another tenant's.
    for card in await _model_cards(request):
        if card.id == model_id:
            return card
    raise model_not_found(model_id)


routes = [completions, chat_completions, list_models, retrieve_model]
