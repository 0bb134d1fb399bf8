"""Plain data shared by the runtime's parts: what a request asks for and what it gets back.

No torch here: the scheduler, the wire protocol and the HTTP app import these without
pulling in the model.
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass, field

import msgspec

MAX_LOGPROBS = 5
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1  # what a torch.Generator takes


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # the client went away or asked to abort
    ERROR = "error"  # the request failed (adapter load, internal fault)


class QueueFull(Exception):
    """The waiting queue is at max_waiting; the caller should retry later (HTTP 503)."""


class EngineDraining(Exception):
    """The engine's shutdown has begun: no new requests are admitted (HTTP 503)."""


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
        """Raise ValueError naming the first field out of range.

        The one owner of the sampling bounds: the wire protocol and the engine both call it.
        """
        if not (math.isfinite(self.temperature) and math.isfinite(self.top_p)):
            raise ValueError("temperature and top_p must be finite numbers")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError("seed must be between 0 and 2**63 - 1")
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
        if len(self.stop) > MAX_STOP_STRINGS or any(
            not s or len(s) > MAX_STOP_CHARS for s in self.stop
        ):
            raise ValueError(
                f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most "
                f"{MAX_STOP_CHARS} characters"
            )


ADAPTER_KEY_SCHEME = "loragate-adapter-key-v1"


def adapter_key(
    sha256: str, rank: int, alpha: float, use_rslora: bool, target_modules: tuple[str, ...]
) -> str:
    """The adapter_key of one version: the runtime's cache identity.

    sha256 over the weights' sha256 and every config field that changes the math, in one
    canonical encoding (docs/internals.md, "Adapter identity"):

        sha256("\n".join([scheme, weights_sha256, str(rank), float(alpha).hex(),
                          "1" if use_rslora else "0", ",".join(sorted(set(target_modules)))]))

    Two versions with the same bytes and another alpha (or rsLoRA, rank, targets) get
    different keys, so neither is ever served with the other's scale. The one definition:
    the gateway calls it to build a reference, the runtime to check one.
    """
    fields = (
        ADAPTER_KEY_SCHEME,
        sha256,
        str(int(rank)),
        float(alpha).hex(),  # exact and canonical: 16 and 16.0 encode alike, 16.0000001 not
        "1" if use_rslora else "0",
        ",".join(sorted(set(target_modules))),
    )
    return hashlib.sha256("\n".join(fields).encode()).hexdigest()


class AdapterRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a runtime needs to fetch and apply one adapter version by itself.

    The one adapter reference: the `adapter` object of the wire body (runtime.protocol
    decodes it straight into this type), and what the scheduler, the cache and the PEFT
    reader get. Its bounds against this runtime are checked in runtime.protocol, which also
    refuses a `key` that is not `adapter_key(...)` of the other fields.
    """

    key: str  # adapter_key(sha256, rank, alpha, use_rslora, targets): device and host tiers
    uri: str  # file:///... or s3://bucket/prefix/sha256/aa/<hex>
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    name: str = ""  # "tenant/adapter@version", for logs and errors only
    # sha256 of adapter_model.safetensors: what is fetched, verified and kept on disk. Empty
    # only in a body from a gateway that predates it (runtime.protocol reads that as legacy).
    sha256: str = ""

    @classmethod
    def for_version(
        cls,
        sha256: str,
        uri: str,
        rank: int,
        alpha: float,
        target_modules: tuple[str, ...],
        use_rslora: bool = False,
        name: str = "",
    ) -> AdapterRef:
        """The reference of one version, its key computed from its weights and config."""
        targets = tuple(sorted(set(target_modules)))
        return cls(
            key=adapter_key(sha256, rank, alpha, use_rslora, targets), uri=uri, rank=rank,
            alpha=float(alpha), target_modules=targets, use_rslora=use_rslora, name=name,
            sha256=sha256,
        )

    @property
    def expected_key(self) -> str:
        """The key these fields must carry."""
        return adapter_key(self.sha256, self.rank, self.alpha, self.use_rslora,
                           self.target_modules)

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA: PEFT's scaling, computed as PEFT does."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


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
    # The wire's error code when the engine knows it (e.g. "adapter_numerics"); else the
    # protocol derives one from `error`.
    error_code: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
