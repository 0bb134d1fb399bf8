"""Per-tenant requests/min and tokens/min as token buckets.

Each bucket holds up to `limit` units and refills at `limit / 60` per second. A request
takes one unit of the request bucket and needs the token bucket above zero; once its answer
is done, the tokens it used (prompt + completion) are taken from the token bucket, which may
go negative and then holds the tenant's next requests until it refills. (The size of an
answer is unknown up front; charging after the fact keeps the budget exact over a minute.)

With Redis, both buckets live there and a Lua script updates them atomically with Redis's own
clock, so every gateway shares one budget per tenant. Without Redis (embedded mode), the same
arithmetic runs in process. When Redis cannot be reached, `fail_open` decides: let the
request through (availability) or answer 429.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from gateway.errors import RateLimited

logger = logging.getLogger("loragate.gateway.ratelimit")
_PREFIX = "loragate:rl:"
_TTL_S = 120  # a bucket untouched for two minutes is full again, so it can expire

# KEYS[1] request bucket, KEYS[2] token bucket
# ARGV[1] requests/min (0: none), ARGV[2] tokens/min (0: none), ARGV[3] tokens to charge,
# ARGV[4] 1 to take a request (admission), 0 to only charge tokens
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
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local charge, admit = tonumber(ARGV[3]), tonumber(ARGV[4])
local r = rpm > 0 and level(KEYS[1], rpm) or 0
local k = tpm > 0 and level(KEYS[2], tpm) or 0
if admit == 1 then
  local wait = 0
  if rpm > 0 and r < 1 then wait = math.max(wait, (1 - r) * 60.0 / rpm) end
  if tpm > 0 and k <= 0 then wait = math.max(wait, (0.001 - k) * 60.0 / tpm) end
  if wait > 0 then return {0, math.ceil(wait * 1000)} end
  if rpm > 0 then
    redis.call('HSET', KEYS[1], 'level', r - 1, 'ts', now)
    redis.call('EXPIRE', KEYS[1], ARGV[5])
  end
  return {1, 0}
end
if tpm > 0 then
  redis.call('HSET', KEYS[2], 'level', k - charge, 'ts', now)
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
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
        if not rpm and not tpm:
            return
        if self._script is not None:
            result = await self._call(tenant, rpm or 0, tpm or 0, 0, admit=True)
            if result is not None:
                allowed, retry_ms = int(result[0]), int(result[1])
                if not allowed:
                    raise _limited(tenant, retry_ms / 1000.0)
                return
            if self.fail_open:
                return
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
            if level <= 0:
                wait = max(wait, (0.001 - level) * 60.0 / tpm)
        if wait > 0:
            raise _limited(tenant, wait)
        if rpm:
            self._local[(tenant, "r")].level -= 1

    async def charge_tokens(self, tenant: str, tpm: int | None, tokens: int) -> None:
        """Take the tokens an answer used from the tenant's token bucket."""
        if not tpm or tokens <= 0:
            return
        if self._script is not None:
            await self._call(tenant, 0, tpm, tokens, admit=False)
            return
        now = time.monotonic()
        bucket = self._bucket(tenant, "t", tpm, now)
        bucket.refill(tpm, now)
        bucket.level -= tokens

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
            return list(await self._script(keys=keys,
                                           args=[rpm, tpm, tokens, int(admit), _TTL_S]))
        except Exception as exc:  # Redis down or slow: the fail_open setting decides
            logger.warning("rate limiter unavailable (%s); failing %s", type(exc).__name__,
                           "open" if self.fail_open else "closed")
            return None


def _limited(tenant: str, wait_s: float) -> RateLimited:
    return RateLimited(f"tenant {tenant} is over its rate limit; retry later",
                       retry_after=max(1, math.ceil(wait_s)))
