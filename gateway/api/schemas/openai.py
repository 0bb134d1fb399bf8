"""Request and response bodies of the OpenAI-compatible routes (API.md, "Tenant API").

Requests are decoded with `decode_completion` / `decode_chat`: msgspec checks types and ranges
in one pass, and any failure becomes `BadRequest` (400 in OpenAI's error shape) naming the
field. Unknown fields are ignored on purpose: OpenAI clients send fields we do not serve
(`frequency_penalty`, `stream_options`, ...) and must not fail for it.

The bounds here are the ones OpenAI's API and API.md define. What depends on the model
(a max_tokens past its context, a token id past its vocabulary) or only on the runtime's
sampler (a seed's range) is the runtime's rule: it answers 400 itself, and the router passes
that on, so it is not restated here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from gateway.api.schemas.strict import decode_json
from gateway.errors import BadRequest

DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default; chat without a limit gets it too
MAX_STOP = 4
MAX_MESSAGES = 4096
# A temperature below this samples as greedy (vLLM's _SAMPLING_EPS): dividing logits by
# 1e-39 overflows them to inf, and the softmax of that is NaN, not the argmax.
GREEDY_BELOW = 1e-5

MaxTokens = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopLogprobs = Annotated[int, Meta(ge=0, le=5)]
Seed = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]  # OpenAI's int64
UserId = Annotated[str, Meta(max_length=256)]
StopList = Annotated[list[str], Meta(max_length=MAX_STOP)]


class StreamOptions(Struct):
    include_usage: bool = False


class CompletionRequest(Struct):
    model: str
    prompt: str | Annotated[list[int], Meta(min_length=1)]
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: str | StopList | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: TopLogprobs | None = None
    user: UserId | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1  # one choice per request is what we serve
    echo: Literal[False] = False
    return_token_ids: bool = False


class ChatMessage(Struct):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(Struct):
    model: str
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: str | StopList | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    user: UserId | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    return_token_ids: bool = False


# --- responses --------------------------------------------------------------------------------


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(Struct, omit_defaults=True):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    token_ids: list[int] | None = None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Usage | None = None


class ChatMessageOut(Struct):
    role: str
    content: str


class ChatChoice(Struct, omit_defaults=True):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    token_ids: list[int] | None = None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    object: str = "chat.completion"
    usage: Usage | None = None


class ModelCard(Struct):
    id: str
    owned_by: str
    object: str = "model"
    created: int = 0


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


def _decode(raw: bytes, kind: type[Any]) -> Any:
    req = decode_json(raw, kind)
    if req.temperature is not None and req.temperature < GREEDY_BELOW:
        req.temperature = 0.0
    return req


def decode_completion(raw: bytes) -> CompletionRequest:
    return _decode(raw, CompletionRequest)


def decode_chat(raw: bytes) -> ChatRequest:
    req: ChatRequest = _decode(raw, ChatRequest)
    for message in req.messages:
        if isinstance(message.content, list):
            # The runtime's chat template takes text; image or audio parts have no meaning here.
            parts = message.content
            if not all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
                raise BadRequest("only text content parts are supported", param="messages")
    return req


def message_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(str(p["text"]) for p in message.content)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
