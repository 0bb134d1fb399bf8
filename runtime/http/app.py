"""The runtime's HTTP face: `POST /generate` (NDJSON stream), `POST /abort/{id}`, `/health`,
`/stats` (docs/internals.md, "Runtime wire protocol"). The process around it (engine loading,
uvicorn, the registry, draining) is `runtime/http/process.py`.

With a `token`, every route but `/health` answers only `Authorization: Bearer <token>`
(API.md "Runtimes"; compared in constant time); 401 otherwise, before the body is read.

`create_runtime_app` takes an already built front (`AsyncLLMEngine` or anything with its
interface) so tests can drive the HTTP layer with a fake engine. Handlers stay thin: parsing
and checks live in `runtime.protocol`, scheduling in the engine.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from litestar import Litestar, Request, Response, get, post
from litestar.background_tasks import BackgroundTask
from litestar.params import FromPath
from litestar.response import Stream

from runtime.lora.protocol import ArtifactScope
from runtime.protocol import (
    MAX_BODY_BYTES,
    ErrorEvent,
    GenerateBody,
    ProtocolError,
    RequestLimits,
    StartEvent,
    build_request,
    decode_generate,
    encode_event,
    output_events,
)
from runtime.types import EngineDraining, EngineRequest, QueueFull, RequestOutput

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # a full queue drains in about a second of decode steps
DRAINING_RETRY_AFTER_S = 5  # enough for a gateway to pick another runtime


class Front(Protocol):
    """The engine as the server sees it (docs/internals.md, "Engine"). A front may also have
    `backlog(request_id) -> int` (outputs queued, not yet taken), which lets the stream
    write those out together (AsyncLLMEngine has it)."""

    async def start(self) -> None: ...
    def generate(self, req: EngineRequest) -> AsyncIterator[RequestOutput]: ...
    def abort(self, request_id: str) -> None: ...
    async def shutdown(self, drain: bool = True) -> None: ...
    def stats(self) -> dict[str, Any]: ...


class PromptTokenizer(Protocol):
    """The tokenizer work the server does itself; the engine detokenizes the output."""

    def encode(self, text: str) -> list[int]: ...  # add_special_tokens=True
    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]: ...
    def token_text(self, token_id: int) -> str: ...


@dataclass(frozen=True)
class RuntimeInfo:
    """What `/health` and the registry say about this runtime, and the limits of /generate."""

    model: str
    device: str
    max_model_len: int
    vocab_size: int
    max_running: int
    max_waiting: int  # over this many waiting requests, /generate answers 503
    max_gpu_adapters: int = 0
    max_lora_rank: int = 64
    store: ArtifactScope | None = None  # where adapters may come from; never in /stats

    @property
    def limits(self) -> RequestLimits:
        """What /generate checks each request against (the engine's own `limits`)."""
        return RequestLimits(
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            max_lora_rank=self.max_lora_rank,
            serves_adapters=self.max_gpu_adapters > 0,
            store=self.store,
        )


@dataclass
class RuntimeState:
    """What the handlers share; `serve()` fills it once the engine is loaded."""

    front: Front | None = None
    tokenizer: PromptTokenizer | None = None
    info: RuntimeInfo | None = None
    draining: bool = False
    streams: set[str] = field(default_factory=set)  # request ids with an open stream
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def loaded(self) -> bool:
        return self.front is not None and self.tokenizer is not None and self.info is not None

    def attach(self, front: Front, tokenizer: PromptTokenizer, info: RuntimeInfo) -> None:
        self.front, self.tokenizer, self.info = front, tokenizer, info

    def open_stream(self, request_id: str) -> None:
        self.streams.add(request_id)
        self._idle.clear()

    def close_stream(self, request_id: str) -> None:
        self.streams.discard(request_id)
        if not self.streams:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no stream is open."""
        await self._idle.wait()


def _error(status: int, message: str, code: str, retry_after: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return Response({"error": {"message": message, "code": code}}, status_code=status,
                    headers=headers)


OPEN_PATHS = frozenset({"/health"})  # the router probes it; it tells nothing a caller could use


def bearer_guard(token: str | None) -> Callable[[Request], Any] | None:
    """The before-request hook refusing a request without the runtime's token (None: open)."""
    if not token:
        return None
    expected = f"Bearer {token}".encode()

    async def guard(request: Request) -> Response | None:
        if request.url.path in OPEN_PATHS:
            return None
        given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if hmac.compare_digest(given, expected):
            return None
        return _error(401, "this runtime answers only its gateways' token", "unauthorized")

    return guard


def _unavailable(state: RuntimeState) -> Response | None:
    if state.draining:
        return _error(503, "this runtime is draining", "draining", DRAINING_RETRY_AFTER_S)
    if not state.loaded:
        return _error(503, "the base model is still loading", "loading", DRAINING_RETRY_AFTER_S)
    return None


def _prompt_ids(body: GenerateBody, tokenizer: PromptTokenizer) -> list[int]:
    if body.prompt_token_ids is not None:
        return body.prompt_token_ids
    if body.prompt is not None:
        return tokenizer.encode(body.prompt)
    assert body.messages is not None  # decode_generate checked that exactly one is set
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    return tokenizer.apply_chat_template(messages)


async def _events(state: RuntimeState, req: EngineRequest) -> AsyncIterator[bytes]:
    """The NDJSON stream of one request; a request that ends any other way is aborted."""
    assert state.front is not None and state.tokenizer is not None
    front, token_text = state.front, state.tokenizer.token_text
    finished, remaining = False, req.sampling.n
    num_prompt, num_completion = len(req.prompt_token_ids), [0] * req.sampling.n
    outputs = front.generate(req)
    lines: list[bytes] = []  # events held for the next write; flushed before any error
    try:
        yield encode_event(StartEvent(prompt_tokens=num_prompt))
        # One write per wake-up, not per event: the events of an output (the last token and
        # its finish) and of every output already queued for this request (n choices, or
        # steps that ran while the loop was busy) go out as one chunk of NDJSON lines.
        backlog = getattr(front, "backlog", None)
        async for out in outputs:
            num_completion[out.index] += len(out.new_token_ids)
            for event in output_events(out, token_text, num_prompt, num_completion[out.index]):
                lines.append(encode_event(event))
            remaining -= out.finished
            if not remaining:  # every choice has ended
                finished = True
                break
            if backlog is None or not backlog(req.request_id):
                yield b"".join(lines)
                lines.clear()
        if lines:
            yield b"".join(lines)
            lines.clear()
        if not finished:
            raise RuntimeError("the engine ended the stream without a final output")
    except ValueError as exc:
        # The engine refused the request (e.g. an id already running): the client's fault,
        # and the message says why.
        finished = True
        yield b"".join(lines) + encode_event(ErrorEvent(code="invalid_request", message=str(exc)))
    except (QueueFull, EngineDraining) as exc:
        # Lost a race with the handler's 503 checks after the stream had begun.
        finished = True
        yield b"".join(lines) + encode_event(ErrorEvent(code="overloaded", message=str(exc)))
    except Exception:
        logger.exception("request %s failed", req.request_id)
        yield b"".join(lines) + encode_event(ErrorEvent(code="internal_error",
                                                        message="the runtime failed"))
    finally:
        # Runs on client disconnect too: the stream task is cancelled at an await in here.
        _finish(state, req.request_id, finished)
        if (aclose := getattr(outputs, "aclose", None)) is not None:
            await aclose()


def _finish(state: RuntimeState, request_id: str, finished: bool) -> None:
    if request_id not in state.streams:
        return  # already done (both the stream and the response's background task call this)
    if not finished and state.front is not None:
        state.front.abort(request_id)
    state.close_stream(request_id)


def _cleanup(state: RuntimeState, request_id: str) -> Callable[[], Any]:
    """After the response: covers a stream cancelled while parked at a `yield`."""

    async def cleanup() -> None:
        _finish(state, request_id, finished=False)

    return cleanup


def create_runtime_app(
    front: Front | None = None,
    *,
    tokenizer: PromptTokenizer | None = None,
    info: RuntimeInfo | None = None,
    state: RuntimeState | None = None,
    on_startup: Sequence[Callable[[], Any]] = (),
    on_shutdown: Sequence[Callable[[], Any]] = (),
    token: str | None = None,
) -> Litestar:
    """The runtime's Litestar app.

    `token`: LORAGATE_RUNTIME_TOKEN; with it, every route but /health needs it as a bearer
    token. None serves unauthenticated (a loopback runtime; `loragate runtime` refuses any
    other bind without one).

    With `front` given the app owns its lifecycle (started on startup, drained on shutdown).
    Without it, `state` is filled later (by `serve()` once the model is loaded) and the app
    answers 503 until then.
    """
    state = state or RuntimeState()
    if front is not None:
        if tokenizer is None or info is None:
            raise ValueError("a front needs its tokenizer and info")
        state.attach(front, tokenizer, info)

    @post("/generate", request_max_body_size=MAX_BODY_BYTES, status_code=200)
    async def generate(request: Request) -> Response | Stream:
        if (refusal := _unavailable(state)) is not None:
            return refusal
        assert state.front is not None and state.tokenizer is not None and state.info is not None
        info = state.info
        try:
            body = decode_generate(await request.body())
            # Tokenizing a long prompt takes a while: keep it off the event loop.
            ids = await asyncio.to_thread(_prompt_ids, body, state.tokenizer)
            req = build_request(body, ids, info.limits)  # the request's one check
        except ProtocolError as exc:
            return _error(400, exc.message, exc.code)
        if req.request_id in state.streams:
            return _error(400, "a request with this request_id is running", "duplicate_request_id")
        if state.front.stats().get("num_waiting", 0) >= info.max_waiting:
            return _error(503, "the waiting queue is full", "queue_full", RETRY_AFTER_S)
        state.open_stream(req.request_id)
        return Stream(
            _events(state, req),
            media_type="application/x-ndjson",
            headers={"Cache-Control": "no-store"},
            background=BackgroundTask(_cleanup(state, req.request_id)),
        )

    @post("/abort/{request_id:str}", status_code=200)
    async def abort(request_id: FromPath[str]) -> dict[str, Any]:
        known = request_id in state.streams
        if state.front is not None:
            state.front.abort(request_id)
        return {"request_id": request_id, "aborted": known}

    @get("/health")
    async def health() -> Response:
        if state.info is None:
            return Response({"status": "loading"}, status_code=503)
        body = {
            "status": "draining" if state.draining else "ok",
            "model": state.info.model,
            "device": state.info.device,
            "max_model_len": state.info.max_model_len,
            "vocab_size": state.info.vocab_size,
        }
        return Response(body, status_code=503 if state.draining or not state.loaded else 200)

    @get("/stats")
    async def stats() -> Response:
        if state.front is None or state.info is None:
            return Response({"status": "loading"}, status_code=503)
        body = dict(state.front.stats())
        body["num_streams"] = len(state.streams)
        body["draining"] = state.draining
        limits = asdict(state.info)
        limits.pop("store")  # the store's paths are the operator's business
        body["limits"] = limits
        return Response(body)

    startup: list[Callable[[], Any]] = list(on_startup)
    shutdown: list[Callable[[], Any]] = list(on_shutdown)
    if front is not None:
        startup.insert(0, front.start)

        async def stop_front() -> None:
            await front.shutdown(drain=True)

        shutdown.append(stop_front)
    return Litestar(
        route_handlers=[generate, abort, health, stats],
        on_startup=startup,
        on_shutdown=shutdown,
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=None,
        before_request=bearer_guard(token),
    )

