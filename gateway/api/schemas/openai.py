"""Request and response bodies of the OpenAI-compatible routes (API.md, "Tenant API").

Requests are decoded with `decode_completion` / `decode_chat`: msgspec checks types and ranges
in one pass, and any failure becomes `BadRequest` (400 in OpenAI's error shape) naming the
field. Every optional field is `T | None = None`: OpenAI's clients send `null` for "not set",
and null means the field's default (applied in openai_format.py). Unknown fields are ignored
on purpose (clients send `store`, `metadata`, ...), but a field OpenAI defines that changes
the answer and that we do not serve (`UNSUPPORTED_*`) is 400 `unsupported_parameter` naming
it, never silently ignored; only its "off" value (`echo: false`, `tools: []`, ...) passes.

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
from runtime.types import GREEDY_BELOW

DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default; chat without a limit gets it too
MAX_STOP = 4
MAX_MESSAGES = 4096
MAX_CHOICES = 16
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # OpenAI's own cap on logit_bias entries

MaxTokens = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopLogprobs = Annotated[int, Meta(ge=0, le=5)]
Seed = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]  # OpenAI's int64
UserId = Annotated[str, Meta(max_length=256)]
StopList = Annotated[list[str], Meta(max_length=MAX_STOP)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=10.0)]
MinP = Annotated[float, Meta(ge=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=-1)]
NumChoices = Annotated[int, Meta(ge=1, le=MAX_CHOICES)]
NumTokens = Annotated[int, Meta(ge=0)]
Bias = Annotated[float, Meta(ge=-100.0, le=100.0)]
TokenIds = Annotated[list[int], Meta(max_length=MAX_STOP_TOKEN_IDS)]

# Fields OpenAI defines that we do not serve, with the values that mean "off" (those pass).
UNSUPPORTED_COMPLETION: dict[str, tuple[Any, ...]] = {
    "best_of": (1,), "echo": (False,), "suffix": ("",),
}
UNSUPPORTED_CHAT: dict[str, tuple[Any, ...]] = {
    "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (),
    "functions": ([],), "function_call": ("none",), "audio": (), "modalities": (["text"],),
    "prediction": (), "web_search_options": (), "reasoning_effort": (),
}


class StreamOptions(Struct):
    include_usage: bool | None = None


class JsonSchema(Struct):
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class SamplingFields(Struct):
    """The sampling and output fields both routes take (API.md), null meaning the default."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: str | StopList | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: UserId | None = None
    n: NumChoices | None = None
    return_token_ids: bool | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    logit_bias: Annotated[dict[str, Bias], Meta(max_length=MAX_LOGIT_BIAS)] | None = None
    min_tokens: NumTokens | None = None
    ignore_eos: bool | None = None
    stop_token_ids: TokenIds | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    model: str
    prompt: str | Annotated[list[int], Meta(min_length=1)]
    max_tokens: MaxTokens | None = None
    logprobs: TopLogprobs | None = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None


class ChatMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(SamplingFields, kw_only=True):
    model: str
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None


# --- responses --------------------------------------------------------------------------------


class PromptTokensDetails(Struct):
    cached_tokens: int  # prompt tokens whose K/V came from this tenant's prefix cache


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


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
    # The runtime samples greedily below GREEDY_BELOW; sent as 0 the request says so plainly.
    if req.temperature is not None and req.temperature < GREEDY_BELOW:
        req.temperature = 0.0
    return req


def _refuse_unsupported(req: Any, fields: dict[str, tuple[Any, ...]]) -> None:
    for name, off in fields.items():
        value = getattr(req, name)
        if value is not None and not any(value == v and type(value) is type(v) for v in off):
            raise BadRequest(f"{name} is not supported by this server",
                             code="unsupported_parameter", param=name)


def _check_fields(req: CompletionRequest | ChatRequest) -> None:
    if req.logit_bias is not None:
        for token in req.logit_bias:
            if not (token.isascii() and token.isdigit()):
                # The id's range is the runtime's (it knows the vocabulary); the shape is ours.
                raise BadRequest("logit_bias keys must be token ids", param="logit_bias")
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema" and (
        fmt.json_schema is None or fmt.json_schema.schema is None
    ):
        raise BadRequest("response_format json_schema needs json_schema.schema",
                         param="response_format")


def decode_completion(raw: bytes) -> CompletionRequest:
    req: CompletionRequest = _decode(raw, CompletionRequest)
    _refuse_unsupported(req, UNSUPPORTED_COMPLETION)
    _check_fields(req)
    return req


def decode_chat(raw: bytes) -> ChatRequest:
    req: ChatRequest = _decode(raw, ChatRequest)
    _refuse_unsupported(req, UNSUPPORTED_CHAT)
    _check_fields(req)
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
