"""OpenAI's API to the runtime's wire format and back (docs/internals.md).

`completion_input` / `chat_input` turn a decoded OpenAI request into the runtime's
`GenerateBody` (the pipeline adds tenant and adapter). The functions below turn a request's
collected events, or one token event, into exactly the JSON OpenAI's API answers, so that
OpenAI's own clients parse it; `for_user` puts a runtime's refusal in the request's terms.
"""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec

from gateway.api.schemas.openai import (
    DEFAULT_MAX_TOKENS,
    ChatChoice,
    ChatCompletion,
    ChatMessageOut,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    PromptTokensDetails,
    Usage,
    message_text,
    stop_list,
)
from gateway.errors import BadRequest
from gateway.inference.runtime_client import Collected
from runtime.protocol import ChatMessage, GenerateBody, LogprobEntry, SamplingBody, TokenEvent

_encoder = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def _or(value: Any, default: Any) -> Any:
    """null means the default (API.md): a field sent as null is a field not sent."""
    return default if value is None else value


def sampling_body(req: CompletionRequest | ChatRequest, max_tokens: int,
                  logprobs: int | None) -> SamplingBody:
    """The request's sampling fields in the runtime's wire type, every null as its default."""
    d = SamplingBody()
    fmt = req.response_format
    return SamplingBody(
        max_tokens=max_tokens, temperature=_or(req.temperature, d.temperature),
        # top_k 0 is "off" in API.md as in vLLM; the runtime spells off -1.
        top_p=_or(req.top_p, d.top_p), top_k=_or(req.top_k, 0) or d.top_k, seed=req.seed,
        stop=stop_list(req.stop), logprobs=logprobs, ignore_eos=_or(req.ignore_eos, False),
        n=_or(req.n, 1), frequency_penalty=_or(req.frequency_penalty, 0.0),
        presence_penalty=_or(req.presence_penalty, 0.0),
        repetition_penalty=_or(req.repetition_penalty, 1.0), min_p=_or(req.min_p, 0.0),
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        min_tokens=_or(req.min_tokens, 0), stop_token_ids=list(req.stop_token_ids or []),
        response_format=None if fmt is None or fmt.type == "text" else fmt.type,
        json_schema=(msgspec.json.encode(fmt.json_schema.schema).decode()
                     if fmt is not None and fmt.type == "json_schema"
                     and fmt.json_schema is not None else None),
    )


def completion_input(req: CompletionRequest, request_id: str) -> GenerateBody:
    text, ids = (req.prompt, None) if isinstance(req.prompt, str) else (None, req.prompt)
    sampling = sampling_body(req, _or(req.max_tokens, DEFAULT_MAX_TOKENS), req.logprobs)
    return GenerateBody(request_id=request_id, prompt=text, prompt_token_ids=ids,
                        sampling=sampling)


def chat_input(req: ChatRequest, request_id: str) -> GenerateBody:
    # The runtime applies the chat template; it takes each message's text. `developer` is
    # OpenAI's new name for the system role: chat templates know only `system`.
    messages = [ChatMessage("system" if m.role == "developer" else m.role, message_text(m))
                for m in req.messages]
    sampling = sampling_body(
        req, req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS,
        (req.top_logprobs or 0) if req.logprobs else None)
    return GenerateBody(request_id=request_id, messages=messages, sampling=sampling)


_PATH_RE = re.compile(r"`\$\.(\w+)")
# The runtime's sampling fields (runtime.protocol.SamplingBody) that a user's field sets.
_SAMPLING_FIELDS = frozenset({"max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                              "logprobs", "n", "frequency_penalty", "presence_penalty",
                              "repetition_penalty", "min_p", "logit_bias", "min_tokens",
                              "stop_token_ids", "response_format"})


def _user_field(field: str, req: CompletionRequest | ChatRequest) -> str:
    if isinstance(req, ChatRequest):
        if field == "max_tokens" and req.max_completion_tokens is not None:
            return "max_completion_tokens"
        if field == "logprobs":
            return "top_logprobs"
    return field


def for_user(exc: BadRequest, req: CompletionRequest | ChatRequest) -> BadRequest:
    """A runtime's refusal as the user's request would name it.

    The runtime checks its own wire body (runtime/protocol.py): its messages say
    `sampling: max_tokens must be ...` or `prompt token ids ...` and carry no `param`. The
    user sent `max_tokens` (or `max_completion_tokens`), `prompt` or `messages`: the message
    loses the wire's prefix and `param` names the user's field. Anything else is unchanged.
    """
    if exc.param is not None:
        return exc
    message, param = exc.message, None
    prompt_field = "messages" if isinstance(req, ChatRequest) else "prompt"
    if message.startswith("sampling: "):
        message = message.removeprefix("sampling: ")
        field = message.split(" ", 1)[0]
        param = _user_field(field, req) if field in _SAMPLING_FIELDS else None
    elif message.startswith("prompt token ids"):
        message, param = "prompt: " + message.removeprefix("prompt "), "prompt"
    elif message.startswith("the prompt") or exc.code == "context_length_exceeded":
        param = prompt_field  # OpenAI names the prompt for a context overflow too
    elif message.startswith("response_format: "):  # the runtime's schema check
        param = "response_format"
    elif message.startswith("invalid body: "):  # msgspec's, with a path into the wire body
        message = (message.removeprefix("invalid body: ").replace("`$.sampling.", "`$.")
                   .replace("`$.prompt_token_ids", "`$.prompt"))
        match = _PATH_RE.search(message)
        path = match.group(1) if match else ""
        param = (_user_field(path, req) if path in _SAMPLING_FIELDS
                 else path if path in ("prompt", "messages") else None)
    else:
        return exc
    return BadRequest(message, code=exc.code, param=param)


def usage_of(got: Collected) -> Usage:
    return Usage(got.prompt_tokens, got.num_completion_tokens, got.num_tokens,
                 PromptTokensDetails(got.cached_tokens))


def completion_logprobs(entries: list[LogprobEntry], offset: int = 0) -> dict[str, Any]:
    offsets, position = [], offset
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode()),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}
                    for t in e.top
                ],
            }
            for e in entries
        ]
    }


def completion_body(
    request_id: str, model: str, got: Collected, *, logprobs: bool, token_ids: bool, n: int = 1
) -> Completion:
    choices = [
        CompletionChoice(
            index=i, text=c.output,
            logprobs=completion_logprobs(c.logprobs) if logprobs else None,
            finish_reason=c.finish_reason,
            token_ids=list(c.token_ids) if token_ids else None,
        )
        for i, c in enumerate(got.ordered(n))
    ]
    return Completion(request_id, int(time.time()), model, choices, usage=usage_of(got))


def chat_body(
    request_id: str, model: str, got: Collected, *, logprobs: bool, token_ids: bool, n: int = 1
) -> ChatCompletion:
    choices = [
        ChatChoice(
            index=i, message=ChatMessageOut("assistant", c.output),
            logprobs=chat_logprobs(c.logprobs) if logprobs else None,
            finish_reason=c.finish_reason,
            token_ids=list(c.token_ids) if token_ids else None,
        )
        for i, c in enumerate(got.ordered(n))
    ]
    return ChatCompletion(request_id, int(time.time()), model, choices, usage=usage_of(got))


def sse(payload: Any) -> bytes:
    return b"data: " + _encoder.encode(payload) + b"\n\n"


class ChunkWriter:
    """SSE chunks of one streamed answer, completions or chat; with n choices each chunk
    carries one choice, by its index, as OpenAI streams them."""

    def __init__(self, request_id: str, model: str, *, chat: bool, logprobs: bool,
                 token_ids: bool, n: int = 1) -> None:
        self.request_id = request_id
        self.model = model
        self.chat = chat
        self.logprobs = logprobs
        self.token_ids = token_ids
        self.n = n
        self.created = int(time.time())
        self._offset = [0] * n  # each choice's text offset, for completions' logprobs
        # A plain token chunk (no logprobs, no token ids) is these bytes around the text as a
        # JSON string, byte for byte what _chunk writes: built once per choice, so a token
        # costs one string encode instead of two dicts and a whole chunk's encode.
        self._plain: dict[int, tuple[bytes, bytes] | None] = {}

    def _chunk(self, choice: dict[str, Any], usage: Usage | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created, "model": self.model,
            "choices": [choice] if choice else [],
        }
        if usage is not None:
            body["usage"] = usage
        return sse(body)

    def role(self) -> bytes:
        return b"".join(
            self._chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None})
            for i in range(self.n))

    def _plain_parts(self, index: int) -> tuple[bytes, bytes] | None:
        if index not in self._plain:
            marker = _encoder.encode("\x00")  # '"\u0000"'
            field = "delta" if self.chat else "text"
            value: Any = {"content": "\x00"} if self.chat else "\x00"
            whole = self._chunk({"index": index, "finish_reason": None, "logprobs": None,
                                 field: value})
            head, _, tail = whole.partition(marker)
            # Only where the marker is the text's alone (an id or model name holding a NUL
            # would make it ambiguous): else every token takes the general path.
            self._plain[index] = (head, tail) if whole.count(marker) == 1 else None
        return self._plain[index]

    def token(self, event: TokenEvent) -> bytes:
        index = event.index
        parts = None
        if not self.token_ids and not (self.logprobs and event.logprobs):
            parts = self._plain_parts(index)
        if parts is not None:
            self._offset[index] += len(event.text)
            return parts[0] + _encoder.encode(event.text) + parts[1]
        choice: dict[str, Any] = {"index": index, "finish_reason": None, "logprobs": None}
        if self.chat:
            choice["delta"] = {"content": event.text}
            if self.logprobs and event.logprobs:
                choice["logprobs"] = chat_logprobs(event.logprobs)
        else:
            choice["text"] = event.text
            if self.logprobs and event.logprobs:
                choice["logprobs"] = completion_logprobs(event.logprobs, self._offset[index])
        self._offset[index] += len(event.text)
        if self.token_ids:
            choice["token_ids"] = event.token_ids
        return self._chunk(choice)

    def finish(self, reason: str, index: int = 0) -> bytes:
        choice: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": None}
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        return self._chunk(choice)

    def usage(self, usage: Usage) -> bytes:
        return self._chunk({}, usage)


def error_chunk(message: str, code: str) -> bytes:
    return sse({"error": {"message": message, "type": "server_error", "code": code,
                          "param": None}})
