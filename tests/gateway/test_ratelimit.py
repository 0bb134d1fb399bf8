"""Token buckets per tenant: exact admission counts, token charges, Retry-After, Redis down."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import RateLimited
from gateway.inference.ratelimit import RateLimiter

pytestmark = pytest.mark.unit


async def admitted(limiter: RateLimiter, tenant: str, n: int, rpm: int | None,
                   tpm: int | None = None) -> int:
    ok = 0
    for _ in range(n):
        try:
            await limiter.admit(tenant, rpm, tpm)
            ok += 1
        except RateLimited as exc:
            assert exc.retry_after is not None and exc.retry_after >= 1
    return ok


async def test_in_process_requests_per_minute_is_exact_and_per_tenant() -> None:
    limiter = RateLimiter()
    assert await admitted(limiter, "a", 20, rpm=6) == 6
    assert await admitted(limiter, "b", 3, rpm=6) == 3
    assert await admitted(limiter, "c", 50, rpm=None) == 50


async def test_in_process_tokens_per_minute_blocks_once_spent() -> None:
    limiter = RateLimiter()
    await limiter.admit("a", None, 100)
    await limiter.charge_tokens("a", 100, 150)  # the answer used more than the budget
    with pytest.raises(RateLimited) as info:
        await limiter.admit("a", None, 100)
    assert info.value.retry_after is not None and info.value.retry_after >= 30


@pytest.mark.integration
async def test_redis_buckets_are_shared_and_exact_under_concurrency(redis_url: str) -> None:
    import redis.asyncio as aioredis

    clients = [aioredis.from_url(redis_url) for _ in range(2)]
    try:
        one, two = (RateLimiter(c) for c in clients)
        results = await asyncio.gather(*(
            (one if i % 2 else two).admit("acme", 10, None) for i in range(40)
        ), return_exceptions=True)
        assert sum(r is None for r in results) == 10
        assert all(isinstance(r, RateLimited) for r in results if r is not None)
        await one.admit("beta", 10, 50)
        await two.charge_tokens("beta", 50, 60)
        with pytest.raises(RateLimited):
            await one.admit("beta", 10, 50)
    finally:
        for c in clients:
            await c.aclose()


async def test_redis_down_fails_open_or_closed_by_setting() -> None:
    import redis.asyncio as aioredis

    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        await RateLimiter(dead, fail_open=True).admit("a", 1, None)
        with pytest.raises(RateLimited):
            await RateLimiter(dead, fail_open=False).admit("a", 1, None)
    finally:
        await dead.aclose()
