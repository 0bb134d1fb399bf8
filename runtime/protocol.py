"""The runtime's wire format (docs/internals.md, "Runtime wire protocol") as msgspec Structs.

`decode_generate` turns a raw `/generate` body into a `GenerateBody` (shape, ids, the prompt
choice); the server tokenizes the prompt; `build_request` turns both into an `EngineRequest`
and checks it once against the runtime's `RequestLimits`, the one place the request rules
live (the engine applies the same check to requests that do not come through the wire).
The NDJSON events the server streams back are tagged Structs whose tag lands in the `"type"`
field. No torch, no litestar: this module is plain data and checks, testable alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import msgspec

from runtime.lora.protocol import (
    ADAPTER_KEY_RE,
    LORA_TARGET_MODULES,
    ArtifactRefused,
    ArtifactScope,
)
from runtime.structured import grammar_text
from runtime.types import (
    AdapterRef,
    EngineRequest,
    FinishReason,
    RequestOutput,
    SamplingParams,
    adapter_key,
)

MAX_BODY_BYTES = 4 * 1024 * 1024  # a 4 MiB body is far more prompt than any context holds
MAX_ID_CHARS = 256
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


class ProtocolError(ValueError):
    """A request the runtime refuses with 400; `code` goes into the error body."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --- request body ---------------------------------------------------------------------------


class SamplingBody(msgspec.Struct, forbid_unknown_fields=True):
    """Sampling and output fields (API.md, "Tenant API"); SamplingParams owns their bounds."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    logprobs: int | None = None
    ignore_eos: bool = False
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)
    min_tokens: int = 0
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    response_format: Literal["json_object", "json_schema"] | None = None
    json_schema: str | None = None  # the schema as JSON text, with response_format json_schema


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str


class GenerateBody(msgspec.Struct, forbid_unknown_fields=True):
    request_id: str
    tenant: str = ""
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    sampling: SamplingBody = msgspec.field(default_factory=SamplingBody)
    adapter: AdapterRef | None = None


def decode_generate(raw: bytes) -> GenerateBody:
    """Parse and check the parts of a body that need no model: shape, ids, the prompt choice."""
    try:
        body = _generate_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid body: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"body is not valid JSON: {exc}") from exc
    rid = body.request_id
    if not rid or len(rid) > MAX_ID_CHARS or not rid.isprintable():
        raise ProtocolError(f"request_id must be 1 to {MAX_ID_CHARS} printable characters")
    if len(body.tenant) > MAX_ID_CHARS:
        raise ProtocolError(f"tenant must be at most {MAX_ID_CHARS} characters")
    given = [f for f in ("prompt", "prompt_token_ids", "messages") if getattr(body, f) is not None]
    if len(given) != 1:
        raise ProtocolError(
            "exactly one of prompt, prompt_token_ids, messages is required"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if body.messages is not None:
        if not body.messages:
            raise ProtocolError("messages must not be empty")
        for message in body.messages:
            if message.role not in CHAT_ROLES:
                raise ProtocolError(f"message role must be one of {sorted(CHAT_ROLES)}")
    return body


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What a request is checked against: this runtime's model, context and adapter slots."""

    max_model_len: int
    vocab_size: int
    max_lora_rank: int
    serves_adapters: bool = True
    # Where adapter artifacts may come from; None: unconfined (an engine embedded without a
    # store, as in tests). `loragate runtime` always configures one (runtime/http/process.py).
    store: ArtifactScope | None = None

    def check(self, req: EngineRequest) -> None:
        """Raise ProtocolError (a ValueError: HTTP 400) when `req` can never be served as asked.

        A prompt must leave room for at least one generated token; the engine stops a request
        with finish reason "length" when prompt plus output reach `max_model_len`.
        """
        ids = req.prompt_token_ids
        if not ids:
            raise ProtocolError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ProtocolError(
                f"the prompt has {len(ids)} tokens and this model's context holds "
                f"{self.max_model_len}: a prompt must be shorter than the context length",
                code="prompt_too_long",
            )
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ProtocolError(f"prompt token ids must be between 0 and {self.vocab_size - 1}")
        asked = len(ids) + req.sampling.max_tokens
        if req.sampling.max_tokens >= 1 and asked > self.max_model_len:
            # Never capped silently: the client asked for more than the context can hold.
            # Checked before the sampling bounds, so a huge max_tokens gets this code too.
            raise ProtocolError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{asked} were requested ({len(ids)} in the prompt, {req.sampling.max_tokens} "
                "for the completion): shorten the prompt or lower max_tokens",
                code="context_length_exceeded",
            )
        try:
            req.sampling.validate(self.max_model_len, self.vocab_size)
        except ValueError as exc:
            raise ProtocolError(f"sampling: {exc}") from exc
        if req.sampling.response_format is not None:
            try:
                grammar_text(req.sampling)  # an invalid schema: 400 here, not a failed stream
            except ValueError as exc:
                raise ProtocolError(str(exc)) from exc
        if req.adapter is not None:
            self._check_adapter(req.adapter)

    def _check_adapter(self, ref: AdapterRef) -> None:
        if not self.serves_adapters:
            raise ProtocolError("this runtime serves no adapters")  # never the base model instead
        if not ADAPTER_KEY_RE.match(ref.key):
            raise ProtocolError("adapter.key must be a lowercase hex sha256 (64 characters)")
        if not ADAPTER_KEY_RE.match(ref.sha256):
            raise ProtocolError("adapter.sha256 must be a lowercase hex sha256 (64 characters)")
        if not ref.uri.startswith(("file:///", "s3://")):
            raise ProtocolError("adapter.uri must be a file:/// or s3:// URI")
        if not 1 <= ref.rank <= self.max_lora_rank:
            raise ProtocolError(f"adapter.rank must be between 1 and {self.max_lora_rank}")
        if not (math.isfinite(ref.alpha) and ref.alpha > 0):
            raise ProtocolError("adapter.alpha must be a positive finite number")
        if not ref.target_modules or not LORA_TARGET_MODULES.issuperset(ref.target_modules):
            known = sorted(LORA_TARGET_MODULES)
            raise ProtocolError(f"adapter.target_modules must be a non-empty subset of {known}")
        if ref.key != ref.expected_key:
            # The key is the cache identity: one that does not follow from the fields could
            # serve this request with another version's weights or scale.
            raise ProtocolError(
                "adapter.key is not the adapter_key of its sha256, rank, alpha, use_rslora and "
                "target_modules", code="adapter_key_mismatch",
            )
        if self.store is not None:
            try:
                self.store.check(ref.uri, ref.sha256)
            except ArtifactRefused as exc:
                raise ProtocolError(str(exc), code="adapter_uri_refused") from None


def legacy_adapter(ref: AdapterRef) -> AdapterRef:
    """A reference from a gateway that predates `sha256`: its `key` was the weights' sha256.

    The identity is computed here from the fields, never taken from the body.
    """
    return msgspec.structs.replace(
        ref, sha256=ref.key,
        key=adapter_key(ref.key, ref.rank, ref.alpha, ref.use_rslora, ref.target_modules),
    )


def sampling_params(body: SamplingBody) -> SamplingParams:
    """The wire's sampling object as the engine's; SamplingParams.validate owns the bounds."""
    return SamplingParams(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=tuple(body.stop),
        logprobs=body.logprobs,
        ignore_eos=body.ignore_eos,
        n=body.n,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty,
        min_p=body.min_p,
        logit_bias=tuple(sorted(body.logit_bias.items())),
        min_tokens=body.min_tokens,
        stop_token_ids=tuple(body.stop_token_ids),
        response_format=body.response_format,
        json_schema=body.json_schema,
    )


def build_request(
    body: GenerateBody, prompt_token_ids: list[int], limits: RequestLimits
) -> EngineRequest:
    """The engine's request for a decoded body and its prompt's ids, checked once."""
    adapter = body.adapter
    if adapter is not None and len(adapter.name) > MAX_ID_CHARS:
        # The name is a label for logs and errors: cut, not refused.
        adapter = msgspec.structs.replace(adapter, name=adapter.name[:MAX_ID_CHARS])
    if adapter is not None and not adapter.sha256 and ADAPTER_KEY_RE.match(adapter.key):
        adapter = legacy_adapter(adapter)  # else the check names the bad key
    req = EngineRequest(
        request_id=body.request_id,
        prompt_token_ids=list(prompt_token_ids),
        sampling=sampling_params(body.sampling),
        adapter=adapter,
        tenant=body.tenant,
    )
    limits.check(req)
    return req


# --- NDJSON events --------------------------------------------------------------------------


class TopLogprob(msgspec.Struct):
    token_id: int
    token: str
    logprob: float


class LogprobEntry(msgspec.Struct):
    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob]


class Usage(msgspec.Struct, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of prompt_tokens, those whose K/V came from the prefix cache


class StartEvent(msgspec.Struct, tag="start", tag_field="type"):
    prompt_tokens: int


class TokenEvent(msgspec.Struct, tag="token", tag_field="type", omit_defaults=True):
    token_ids: list[int]
    text: str
    logprobs: list[LogprobEntry] | None
    index: int = 0  # the choice, with n > 1


class FinishEvent(msgspec.Struct, tag="finish", tag_field="type", omit_defaults=True):
    """One choice ended; with n choices the stream carries n of them. `usage` is the choice's:
    the prompt's tokens and this choice's completion tokens."""

    finish_reason: Literal["stop", "length", "abort"]
    usage: Usage
    index: int = 0


class ErrorEvent(msgspec.Struct, tag="error", tag_field="type"):
    code: str
    message: str


Event = StartEvent | TokenEvent | FinishEvent | ErrorEvent
TokenText = Callable[[int], str]  # token id -> its text, for logprob entries
_encoder = msgspec.json.Encoder()
# A Decoder built once: msgspec.json.decode(line, type=Event) resolves the tagged union on
# every call (4.4 us a token event, against 0.24 us here), once per streamed token.
_event_decoder = msgspec.json.Decoder(Event)
_generate_decoder = msgspec.json.Decoder(GenerateBody)  # one per /generate body, likewise


def encode_event(event: Event) -> bytes:
    """One NDJSON line."""
    return _encoder.encode(event) + b"\n"


def decode_event(line: bytes) -> Event:
    """The client side (gateway, tests): one NDJSON line back into its event."""
    return _event_decoder.decode(line)


def error_code(message: str) -> str:
    """The error event's code for an engine's error string.

    The engine reports failures as text on `RequestOutput.error`; adapter failures are the
    only kind the gateway treats differently (it may retry on another runtime), so they get
    their own code. The engine's messages for them start with "adapter".
    """
    return "adapter_load_failed" if message.lower().startswith("adapter") else "internal_error"


def output_events(
    out: RequestOutput,
    token_text: TokenText | None,
    num_prompt_tokens: int,
    num_completion_tokens: int,
) -> list[Event]:
    """The events for one engine output: a token event if it carries tokens, then the end.

    `num_completion_tokens` is how many tokens the stream has carried so far, this output's
    included; the engine's own counts win when it reports them.
    """
    events: list[Event] = []
    if out.new_token_ids or out.text_delta:
        logprobs = None
        if out.new_logprobs is not None and token_text is not None:
            logprobs = [
                LogprobEntry(
                    token_id=lp.token_id,
                    token=token_text(lp.token_id),
                    logprob=lp.logprob,
                    top=[TopLogprob(t, token_text(t), p) for t, p in lp.top],
                )
                for lp in out.new_logprobs
            ]
        events.append(TokenEvent(list(out.new_token_ids), out.text_delta, logprobs, out.index))
    if out.finished:
        if out.finish_reason is FinishReason.ERROR or out.error is not None:
            message = out.error or "the request failed"
            events.append(ErrorEvent(out.error_code or error_code(message), message))
        else:
            reason = (out.finish_reason or FinishReason.STOP).value
            usage = Usage(
                out.num_prompt_tokens or num_prompt_tokens,
                out.num_output_tokens or num_completion_tokens,
                out.num_cached_tokens,
            )
            events.append(FinishEvent(reason, usage, out.index))  # type: ignore[arg-type]
    return events
