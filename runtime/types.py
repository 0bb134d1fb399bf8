"""Plain data shared by the runtime's parts: what a request asks for and what it gets back.

No torch here: the scheduler and the server import these without pulling in the model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

MAX_LOGPROBS = 5


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # the client went away or asked to abort
    ERROR = "error"  # the request failed (adapter load, internal fault)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 means no top-k cut
    seed: int | None = None  # same seed, same tokens, whatever else is in the batch
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no logprobs; 0..5: chosen token plus that many alternatives
    ignore_eos: bool = False

    def validate(self, max_model_len: int) -> None:
        """Raise ValueError naming the first field out of range."""
        if not 1 <= self.max_tokens <= max_model_len:
            raise ValueError(f"max_tokens must be between 1 and {max_model_len}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError("top_k must be -1 (off) or a positive integer")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}")
        if len(self.stop) > 4 or any(not s or len(s) > 256 for s in self.stop):
            raise ValueError("stop takes at most 4 non-empty strings of at most 256 characters")


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """Everything a runtime needs to fetch and apply one adapter version by itself."""

    key: str  # sha256 of adapter_model.safetensors: the cache key (adapter_key)
    uri: str  # file:///... or s3://bucket/prefix/sha256/aa/<hex>
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    name: str = ""  # "tenant/adapter@version", for logs and errors only

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5) if self.use_rslora else self.alpha / self.rank


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: AdapterRef | None = None
    tenant: str = ""  # fair share between tenants in the scheduler


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first


@dataclass(slots=True)
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    text_delta: str = ""  # detokenized incrementally; held back while a stop string may match
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None  # set with FinishReason.ERROR
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
