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
MAX_CHOICES = 16
MAX_LOGIT_BIAS = 300
MAX_STOP_TOKEN_IDS = 64


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed, from (seed, index): choice 0 keeps the request's seed, so n=1
    answers as before; the others get well-mixed seeds that differ from each other's."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # the client went away or asked to abort
    ERROR = "error"  # the request failed (adapter load, internal fault)


class QueueFull(Exception):
    """The waiting queue is at max_waiting; the caller should retry later (HTTP 503)."""


class EngineDraining(Exception):
    """The engine's shutdown has begun: no new requests are admitted (HTTP 503)."""


# A temperature below this samples greedily (vLLM's _SAMPLING_EPS): dividing logits by 1e-39
# overflows them to inf, and the softmax of that is NaN, not the argmax.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # below GREEDY_BELOW (0 included) means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 means no top-k cut
    seed: int | None = None  # same seed, same tokens, whatever else is in the batch
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no logprobs; 0..5: chosen token plus that many alternatives
    ignore_eos: bool = False  # EOS neither stops nor is masked by min_tokens
    n: int = 1  # choices: one shared prompt, n sequences, choice i seeded from (seed, i)
    # OpenAI: logits[t] -= count[t] * frequency + (count[t] > 0) * presence, generated tokens
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # transformers' RepetitionPenaltyLogitsProcessor over prompt and generated tokens:
    # a seen token's logit l becomes l / p if l > 0 else l * p
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # drop tokens whose probability is under min_p * the best one's
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many were generated
    stop_token_ids: tuple[int, ...] = ()  # these stop like EOS (their text is not emitted)
    response_format: str | None = None  # None (text), "json_object" or "json_schema"
    json_schema: str | None = None  # JSON text of the schema, with "json_schema"

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def uses_penalties(self) -> bool:
        return (self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def validate(self, max_model_len: int, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first field out of range.

        The one owner of the sampling bounds: the wire protocol and the engine both call it.
        Token ids (logit_bias, stop_token_ids) are checked against `vocab_size` when given.
        """
        floats = (self.temperature, self.top_p, self.frequency_penalty, self.presence_penalty,
                  self.repetition_penalty, self.min_p, *(b for _, b in self.logit_bias))
        if not all(math.isfinite(x) for x in floats):
            raise ValueError("temperature, top_p, penalties, min_p and logit_bias must be finite")
        if not 1 <= self.n <= MAX_CHOICES:
            raise ValueError(f"n must be between 1 and {MAX_CHOICES}")
        if not (-2.0 <= self.frequency_penalty <= 2.0 and -2.0 <= self.presence_penalty <= 2.0):
            raise ValueError("frequency_penalty and presence_penalty must be between -2 and 2")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError("repetition_penalty must be in (0, 10]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be between 0 and 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if len(self.logit_bias) > MAX_LOGIT_BIAS or any(
            not -100.0 <= b <= 100.0 for _, b in self.logit_bias
        ):
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} biases in -100..100")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids")
        if vocab_size is not None:
            ids = [t for t, _ in self.logit_bias] + list(self.stop_token_ids)
            if any(not 0 <= t < vocab_size for t in ids):
                raise ValueError(
                    f"logit_bias and stop_token_ids take token ids between 0 and {vocab_size - 1}")
        if self.response_format not in (None, "json_object", "json_schema"):
            raise ValueError("response_format must be json_object or json_schema")
        if (self.response_format == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema goes with response_format json_schema, and only there")
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
    num_cached_tokens: int = 0  # of the prompt's tokens, those the prefix cache supplied
    num_output_tokens: int = 0
    index: int = 0  # the choice (0..n-1); `finished` ends this choice, the request ends with all
