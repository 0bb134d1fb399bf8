"""Quality feedback: which answer a completion id was, and the scores booked per variant.

`AnswerLog.remember(id, Served)` is called once the runtime took a request, before the
client can see its id; `POST /v1/feedback` calls `AnswerLog.score(tenant, id, score)`, which
finds what served the answer and books the score to its experiment variant or rollout arm
and stage (scores may come days late and in any order: they are booked where the answer was
served, not where traffic is now). One score per answer: a second one replaces the first,
so a client that retries cannot count twice. An id that is unknown, expired or another
tenant's is the same `NotFound`, so ids cannot be probed across tenants.

Storage per answer, bounded:
- Redis (shared by replicas): one hash `loragate:fb:<id>` with the served target (`t`, a
  compact JSON array) and the score (`s`), expiring after `ttl_s`. Measured with MEMORY USAGE
  (tests/gateway/test_feedback.py), allocator rounding included: 200 bytes with names of up
  to 8 characters, at most `REDIS_BYTES_PER_ANSWER` (400) with names of up to 16, at most
  `REDIS_MAX_BYTES_PER_ANSWER` (600) with every name at its 63-character maximum. A week of
  100 answers/s at 200 bytes is 12 GB: size LORAGATE_FEEDBACK_TTL_S to the labels' delay.
- In process: an insertion-ordered dict of at most `max_entries` answers (the oldest go
  first), each also dropped after `ttl_s`; about 400 bytes of Python objects per answer.

Scores per variant are running sums (count, sum, sum of squares) in `ScoreBook`, so each
figure is exact however many scores arrive, in O(1) space: count, mean, a 95% confidence
interval, and Welch's two-sample t-test between variants.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from adapters.errors import NotFound

logger = logging.getLogger("loragate.gateway.feedback")
ANSWER_PREFIX = "loragate:fb:"
SCORES_PREFIX = "loragate:fbs:"
REDIS_BYTES_PER_ANSWER = 400
REDIS_MAX_BYTES_PER_ANSWER = 600
Z_95 = 1.959963984540054

# Atomically: the answer's target and its previous score, and the new score set; nothing
# for an answer of another tenant (ARGV[2]), whose score must stay as it was.
_SCORE_LUA = """
local t = redis.call('HGET', KEYS[1], 't')
if not t or cjson.decode(t)[1] ~= ARGV[2] then return false end
local old = redis.call('HGET', KEYS[1], 's')
redis.call('HSET', KEYS[1], 's', ARGV[1])
return {t, old or ''}
"""


@dataclass(frozen=True, slots=True)
class Served:
    """What served one answer: the keys its score is booked under."""

    tenant: str
    adapter: str | None = None  # None: the base model
    version: int | None = None
    experiment_id: int | None = None
    variant: str | None = None  # the experiment's variant
    rollout_id: int | None = None
    stage: int | None = None  # the rollout's stage when the answer was served
    arm: str | None = None  # "stable" | "candidate"

    def encode(self) -> bytes:
        fields = [self.tenant, self.adapter, self.version, self.experiment_id, self.variant,
                  self.rollout_id, self.stage, self.arm]
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> Served:
        return cls(*json.loads(raw))

    def score_keys(self) -> list[str]:
        keys = []
        if self.experiment_id is not None and self.variant is not None:
            keys.append(experiment_key(self.tenant, self.experiment_id, self.variant))
        if self.rollout_id is not None and self.stage is not None and self.arm is not None:
            keys.append(rollout_key(self.rollout_id, self.stage, self.arm))
        return keys


def experiment_key(tenant: str, experiment_id: int, variant: str) -> str:
    return f"exp:{tenant}:{experiment_id}:{variant}"


def rollout_key(rollout_id: int, stage: int, arm: str) -> str:
    return f"ro:{rollout_id}:{stage}:{arm}"


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True, slots=True)
class Scores:
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def variance(self) -> float | None:
        """The sample variance (n - 1); None below two scores."""
        if self.count < 2:
            return None
        mean = self.total / self.count
        return max(0.0, (self.total_sq - self.count * mean * mean) / (self.count - 1))

    def ci95(self) -> tuple[float, float] | None:
        """mean +- 1.96 * s / sqrt(n), clipped to the score range [0, 1]."""
        variance, mean = self.variance, self.mean
        if variance is None or mean is None:
            return None
        half = Z_95 * math.sqrt(variance / self.count)
        return (max(0.0, mean - half), min(1.0, mean + half))

    def figures(self) -> dict[str, Any]:
        mean, ci = self.mean, self.ci95()
        return {
            "feedback_count": self.count,
            "feedback_mean": round(mean, 6) if mean is not None else None,
            "feedback_ci95": [round(ci[0], 6), round(ci[1], 6)] if ci is not None else None,
        }


def welch_test(a: Scores, b: Scores) -> dict[str, float] | None:
    """Welch's two-sample t-test of mean(a) - mean(b): t, degrees of freedom, two-sided p.

    None below two scores per side. Equal means with no variance give t = 0, p = 1."""
    va, vb = a.variance, b.variance
    if va is None or vb is None or a.mean is None or b.mean is None:
        return None
    sa, sb = va / a.count, vb / b.count
    diff = a.mean - b.mean
    if sa + sb == 0:
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return {"t": t, "df": float(a.count + b.count - 2), "p_value": 1.0 if diff == 0 else 0.0}
    t = diff / math.sqrt(sa + sb)
    df = (sa + sb) ** 2 / (sa**2 / (a.count - 1) + sb**2 / (b.count - 1))
    p = _incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return {"t": round(t, 6), "df": round(df, 3), "p_value": round(min(1.0, max(0.0, p)), 6)}


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (Numerical Recipes' continued
    fraction); two-sided Student p = I_{df/(df+t^2)}(df/2, 1/2)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-14
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


# ------------------------------------------------------------------------------- storage


class ScoreBook:
    """Running score sums per key, in Redis (one hash per key: n, s, ss) or in process."""

    def __init__(self, redis: Any = None) -> None:
        self.redis = redis
        self._local: dict[str, list[float]] = {}

    async def add(self, keys: Iterable[str], score: float, replaces: float | None) -> None:
        """Book `score` under each key; `replaces` is the answer's earlier score, taken out."""
        count = 0 if replaces is not None else 1
        old = replaces or 0.0
        delta, delta_sq = score - old, score * score - old * old
        if self.redis is None:
            for key in keys:
                row = self._local.setdefault(key, [0, 0.0, 0.0])
                row[0] += count
                row[1] += delta
                row[2] += delta_sq
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                full = SCORES_PREFIX + key
                if count:
                    pipe.hincrby(full, "n", count)
                pipe.hincrbyfloat(full, "s", delta)
                pipe.hincrbyfloat(full, "ss", delta_sq)
            await pipe.execute()

    async def read(self, keys: Iterable[str]) -> dict[str, Scores]:
        keys = list(keys)
        if self.redis is None:
            return {k: Scores(int(r[0]), r[1], r[2]) for k in keys if (r := self._local.get(k))}
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(SCORES_PREFIX + key)
            rows = await pipe.execute()
        out = {}
        for key, raw in zip(keys, rows, strict=True):
            if raw:
                fields = {k.decode(): v for k, v in raw.items()}
                out[key] = Scores(int(fields.get("n", 0)), float(fields.get("s", 0)),
                                  float(fields.get("ss", 0)))
        return out


class AnswerLog:
    """Completion id -> what served it, for `ttl_s`; and the scores booked from it."""

    def __init__(self, redis: Any = None, *, ttl_s: float, max_entries: int,
                 scores: ScoreBook | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.scores = scores if scores is not None else ScoreBook(redis)
        self._clock = clock
        # id -> (expires_at, served, score or None); insertion order is age order.
        self._local: OrderedDict[str, tuple[float, Served, float | None]] = OrderedDict()
        self._score_script: Any = None

    async def remember(self, completion_id: str, served: Served) -> None:
        """Keep the answer for scoring; a failure only costs its later feedback (404)."""
        if self.redis is None:
            self._local[completion_id] = (self._clock() + self.ttl_s, served, None)
            self._local.move_to_end(completion_id)
            while len(self._local) > self.max_entries:
                self._local.popitem(last=False)
            return
        key = ANSWER_PREFIX + completion_id
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, "t", served.encode())
                pipe.expire(key, max(1, math.ceil(self.ttl_s)))
                await pipe.execute()
        except Exception as exc:  # the answer still goes out; only its feedback is lost
            logger.warning("answer not kept for feedback: %s", type(exc).__name__)

    async def score(self, tenant: str, completion_id: str, score: float) -> Served:
        """Book `score` to what served the tenant's answer; NotFound for any other id."""
        found = await self._swap_score(tenant, completion_id, score)
        if found is None:
            raise NotFound(f"no answer {completion_id!r} of this tenant to score")
        served, previous = found
        await self.scores.add(served.score_keys(), score, previous)
        return served

    async def _swap_score(self, tenant: str, completion_id: str,
                          score: float) -> tuple[Served, float | None] | None:
        if self.redis is None:
            entry = self._local.get(completion_id)
            if entry is None:
                return None
            expires_at, served, previous = entry
            if expires_at <= self._clock():
                del self._local[completion_id]
                return None
            if served.tenant != tenant:
                return None
            self._local[completion_id] = (expires_at, served, score)
            return served, previous
        if self._score_script is None:
            self._score_script = self.redis.register_script(_SCORE_LUA)
        found = await self._score_script(keys=[ANSWER_PREFIX + completion_id],
                                         args=[repr(score), tenant])
        if not found:
            return None
        raw, old = found
        return Served.decode(raw), float(old) if old else None


async def experiment_scores(book: ScoreBook, tenant: str, experiment_id: int,
                            variants: list[str]) -> dict[str, dict[str, Any]]:
    """Each variant's feedback figures, and Welch's test of each against the first variant."""
    keys = {v: experiment_key(tenant, experiment_id, v) for v in variants}
    found = await book.read(keys.values())
    scores = {v: found.get(key, Scores()) for v, key in keys.items()}
    out: dict[str, dict[str, Any]] = {}
    for variant in variants:
        figures = scores[variant].figures()
        if variant != variants[0]:
            test = welch_test(scores[variant], scores[variants[0]])
            figures["feedback_test"] = {"against": variants[0], **test} if test else None
        out[variant] = figures
    return out
