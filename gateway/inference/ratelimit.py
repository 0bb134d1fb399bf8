"""Per-tenant requests/min and tokens/min as token buckets, with tokens reserved up front.

Each bucket holds up to `limit` units and refills at `limit / 60` per second. A request takes
one unit of the request bucket and reserves, from the token bucket, an upper bound of the
tokens it can use (`reservation`: its prompt's bound plus `max_tokens`); it is admitted only
if the bucket holds that much, so concurrent requests can never spend more than the budget
between them. A request whose bound exceeds the whole per-minute budget can never fit: a 429
that says so. Once the answer is done, however it ended (finished, refused, shed, client
gone), `settle` gives back what the reservation held over the tokens really used (the
runtime's prompt count plus the completion), so the budget is exact over a minute.

With Redis, both buckets live there and one Lua script updates them atomically with Redis's
own clock (the reservation and the refund are each one script call), so every gateway shares
one budget per tenant. A bucket's key expires only once it would have refilled completely,
so a debt is never forgotten. Without Redis (embedded mode), the same arithmetic runs in
process. When Redis cannot be reached, `fail_open` decides: let the request through
(availability, with nothing reserved) or answer 429.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from gateway.errors import RateLimited
from runtime.protocol import GenerateBody

logger = logging.getLogger("loragate.gateway.ratelimit")
_PREFIX = "loragate:rl:"

# Tokens a tokenizer may add around a string prompt's own: BOS/EOS from
# `add_special_tokens=True`, SentencePiece's dummy-prefix piece. Generous on purpose.
SPECIAL_TOKENS_ALLOWANCE = 8
# Tokens a chat template may add per message (role markers and separators: ChatML's
# `<|im_start|>role\n ... <|im_end|>\n` is 4 plus the role, Llama 3's 5, Mistral's [INST]
# pair about 8) and once per conversation (BOS, the generation prompt, a default system
# prompt such as SmolLM2's or Qwen2's, a date header such as Llama 3.1's).
CHAT_TOKENS_PER_MESSAGE = 16
CHAT_TOKENS_PER_CONVERSATION = 64


def reservation(body: GenerateBody) -> int:
    """An upper bound of the tokens `body` can use: its prompt's tokens plus `max_tokens`
    for each of its `n` choices.

    Only the runtime knows the true prompt count (its start event reports it), so admission
    bounds it: ids are counted as given; text is bounded by its UTF-8 byte length, since the
    tokenizers of the served families (byte-level BPE: Llama 3, Qwen2, SmolLM; SentencePiece
    with byte fallback: Llama 2, Mistral) emit each token for at least one byte of the text,
    plus the special tokens and template text they add around it (the allowances above,
    bounds for the templates of those families, not for any template). Should a template add
    more, `settle` charges the difference: the budget stays exact, only that one admission
    was lenient.
    """
    if body.prompt_token_ids is not None:
        prompt = len(body.prompt_token_ids)
    elif body.messages is not None:
        prompt = CHAT_TOKENS_PER_CONVERSATION + sum(
            CHAT_TOKENS_PER_MESSAGE + len(m.role.encode()) + len(m.content.encode())
            for m in body.messages)
    else:
        prompt = SPECIAL_TOKENS_ALLOWANCE + len((body.prompt or "").encode())
    return prompt + body.sampling.max_tokens * body.sampling.n


# KEYS[1] request bucket, KEYS[2] token bucket
# ARGV[1] requests/min (0: none), ARGV[2] tokens/min (0: none), ARGV[3] tokens,
# ARGV[4] 1: admission (take a request, reserve ARGV[3] tokens); 0: settle (take ARGV[3]
# tokens, a negative amount gives tokens back, up to the limit)
# Returns {allowed 0|1, retry_after_ms}
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function level(key, limit)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local lvl = tonumber(v[1]) or limit
  local ts = tonumber(v[2]) or now
  return math.min(limit, lvl + (now - ts) * limit / 60.0)
end
local function store(key, lvl, limit)
  redis.call('HSET', key, 'level', lvl, 'ts', now)
  -- Gone only once it would be full again: dropping it then loses nothing, and a debt
  -- (a negative level) lives until it has been repaid.
  redis.call('EXPIRE', key, math.ceil((limit - lvl) * 60.0 / limit) + 1)
end
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local tokens, admit = tonumber(ARGV[3]), tonumber(ARGV[4])
local r = rpm > 0 and level(KEYS[1], rpm) or 0
local k = tpm > 0 and level(KEYS[2], tpm) or 0
if admit == 1 then
  local wait = 0
  if rpm > 0 and r < 1 then wait = math.max(wait, (1 - r) * 60.0 / rpm) end
  local need = math.max(tokens, 0.001)
  if tpm > 0 and k < need then wait = math.max(wait, (need - k) * 60.0 / tpm) end
  if wait > 0 then return {0, math.ceil(wait * 1000)} end
  if rpm > 0 then store(KEYS[1], r - 1, rpm) end
  if tpm > 0 and tokens > 0 then store(KEYS[2], k - tokens, tpm) end
  return {1, 0}
end
if tpm > 0 then store(KEYS[2], math.min(tpm, k - tokens), tpm) end
return {1, 0}
"""


class _Bucket:
    __slots__ = ("level", "ts")

    def __init__(self, level: float, ts: float) -> None:
        self.level = level
        self.ts = ts

    def refill(self, limit: int, now: float) -> float:
        self.level = min(limit, self.level + (now - self.ts) * limit / 60.0)
        self.ts = now
        return self.level


class RateLimiter:
    def __init__(self, redis: Any = None, *, fail_open: bool = True) -> None:
        self.redis = redis
        self.fail_open = fail_open
        self._script: Any = redis.register_script(_SCRIPT) if redis is not None else None
        self._local: dict[tuple[str, str], _Bucket] = {}

    async def admit(self, tenant: str, rpm: int | None, tpm: int | None) -> None:
        """Take one request from the tenant's budget, or raise RateLimited(retry_after)."""
        await self.reserve(tenant, rpm, tpm, 0)

    async def reserve(self, tenant: str, rpm: int | None, tpm: int | None, tokens: int) -> int:
        """Take one request and reserve `tokens` (an upper bound of what the request can use)
        from the tenant's budget, or raise RateLimited(retry_after). Returns the tokens
        reserved, for `settle`: 0 when nothing was (no token limit, or Redis failed open)."""
        if not rpm and not tpm:
            return 0
        if tpm and tokens > tpm:
            # Waiting never helps: the bucket never holds more than the limit.
            raise RateLimited(
                f"this request may use up to {tokens} tokens (prompt plus max_tokens), more "
                f"than tenant {tenant}'s whole budget of {tpm} tokens per minute; lower "
                "max_tokens or shorten the prompt", retry_after=60)
        reserved = tokens if tpm else 0
        if self._script is not None:
            result = await self._call(tenant, rpm or 0, tpm or 0, reserved, admit=True)
            if result is not None:
                allowed, retry_ms = int(result[0]), int(result[1])
                if not allowed:
                    raise _limited(tenant, retry_ms / 1000.0)
                return reserved
            if self.fail_open:
                return 0
            # Still a 429 (the client backs off and retries), but not "over its limit":
            # nobody knows whether it is, and the message must not say so.
            raise RateLimited("rate limits cannot be checked right now; retry later",
                              retry_after=1)
        now = time.monotonic()
        wait = 0.0
        if rpm:
            level = self._bucket(tenant, "r", rpm, now).refill(rpm, now)
            if level < 1:
                wait = (1 - level) * 60.0 / rpm
        if tpm:
            level = self._bucket(tenant, "t", tpm, now).refill(tpm, now)
            need = max(reserved, 0.001)
            if level < need:
                wait = max(wait, (need - level) * 60.0 / tpm)
        if wait > 0:
            raise _limited(tenant, wait)
        if rpm:
            self._local[(tenant, "r")].level -= 1
        if tpm:
            self._local[(tenant, "t")].level -= reserved
        return reserved

    async def settle(self, tenant: str, tpm: int | None, reserved: int, used: int) -> None:
        """After an answer: give back what `reserve` held beyond the tokens `used`, or take
        what it used beyond the reservation."""
        delta = max(0, used) - reserved
        if not tpm or delta == 0:
            return
        if self._script is not None:
            await self._call(tenant, 0, tpm, delta, admit=False)
            return
        now = time.monotonic()
        bucket = self._bucket(tenant, "t", tpm, now)
        bucket.refill(tpm, now)
        bucket.level = min(float(tpm), bucket.level - delta)

    async def charge_tokens(self, tenant: str, tpm: int | None, tokens: int) -> None:
        """Take `tokens` from the tenant's token bucket (an answer nothing was reserved for)."""
        if tokens > 0:
            await self.settle(tenant, tpm, 0, tokens)

    def _bucket(self, tenant: str, kind: str, limit: int, now: float) -> _Bucket:
        bucket = self._local.get((tenant, kind))
        if bucket is None:
            bucket = self._local[(tenant, kind)] = _Bucket(float(limit), now)
        return bucket

    async def _call(
        self, tenant: str, rpm: int, tpm: int, tokens: int, *, admit: bool
    ) -> list[Any] | None:
        keys = [f"{_PREFIX}{tenant}:r", f"{_PREFIX}{tenant}:t"]
        try:
            return list(await self._script(keys=keys, args=[rpm, tpm, tokens, int(admit)]))
        except Exception as exc:  # Redis down or slow: the fail_open setting decides
            logger.warning("rate limiter unavailable (%s); failing %s", type(exc).__name__,
                           "open" if self.fail_open else "closed")
            return None


def _limited(tenant: str, wait_s: float) -> RateLimited:
    return RateLimited(f"tenant {tenant} is over its rate limit; retry later",
                       retry_after=max(1, math.ceil(wait_s)))
