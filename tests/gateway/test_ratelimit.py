"""Token buckets per tenant: exact admission counts, token charges, Retry-After, Redis down."""

from __future__ import annotations

import asyncio
from pathlib import Path

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


# --- issue 12, finding 5: tokens are reserved at admission and settled after -------------------


async def test_reservation_is_held_until_settled_then_refunded_down_to_the_tokens_used() -> None:
    limiter = RateLimiter()
    assert await limiter.reserve("a", None, 100, 60) == 60
    with pytest.raises(RateLimited):  # 40 left: a second 60 may not start meanwhile
        await limiter.reserve("a", None, 100, 60)
    await limiter.settle("a", 100, reserved=60, used=10)
    assert await limiter.reserve("a", None, 100, 85) == 85  # 90 back, refill aside


async def test_a_request_over_the_whole_token_budget_is_refused_saying_so() -> None:
    limiter = RateLimiter()
    with pytest.raises(RateLimited) as info:
        await limiter.reserve("a", 60, 100, 101)
    assert "101" in info.value.message and "100 tokens per minute" in info.value.message
    assert info.value.retry_after is not None and info.value.retry_after >= 1
    assert await limiter.reserve("a", 60, 100, 100) == 100  # the refusal took nothing


async def test_no_token_limit_reserves_nothing() -> None:
    limiter = RateLimiter()
    assert await limiter.reserve("a", 10, None, 10**9) == 0
    await limiter.settle("a", None, 0, 10**9)  # nothing to settle against


@pytest.mark.real_model
def test_the_reservation_bounds_the_true_token_count_from_above(smollm2_dir: Path) -> None:
    """The prompt part of `reservation` against a real tokenizer and chat template
    (SmolLM2's byte-level BPE, with its default system prompt), texts that tokenize badly
    included: it may never be below what the runtime counts."""
    from transformers import AutoTokenizer

    from gateway.inference.ratelimit import reservation
    from runtime.protocol import ChatMessage, GenerateBody, SamplingBody

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["", "hi", "one two three", "ü" * 50, "日本語のテキスト" * 20, "\x00\x01\x7f" * 30,
             "🤖" * 40, "a" * 3000, " " * 500, "\n\n\t" * 100]
    for text in texts:
        body = GenerateBody("r", prompt=text, sampling=SamplingBody(max_tokens=1))
        assert reservation(body) - 1 >= len(tokenizer(text)["input_ids"]), text
        messages = [ChatMessage("user", text), ChatMessage("assistant", text[::-1]),
                    ChatMessage("user", "")]
        chat = GenerateBody("r", messages=messages, sampling=SamplingBody(max_tokens=7))
        ids = tokenizer.apply_chat_template([{"role": m.role, "content": m.content}
                                             for m in messages], add_generation_prompt=True)
        assert reservation(chat) - 7 >= len(ids), text
    ids_body = GenerateBody("r", prompt_token_ids=[1, 2, 3], sampling=SamplingBody(max_tokens=5))
    assert reservation(ids_body) == 8  # ids are counted exactly


def test_n_choices_reserve_max_tokens_for_each_choice() -> None:
    # n choices can generate n x max_tokens: reserving one choice's worth let n=16 requests
    # overspend a tokens-per-minute budget 16-fold before settling caught up.
    from gateway.inference.ratelimit import reservation
    from runtime.protocol import GenerateBody, SamplingBody

    ids = [1, 2, 3]
    one = GenerateBody("r", prompt_token_ids=ids, sampling=SamplingBody(max_tokens=100))
    many = GenerateBody("r", prompt_token_ids=ids, sampling=SamplingBody(max_tokens=100, n=16))
    assert reservation(one) == 103 and reservation(many) == 3 + 16 * 100


@pytest.mark.integration
async def test_redis_reservations_are_atomic_across_gateways(redis_url: str) -> None:
    import uuid

    import redis.asyncio as aioredis

    tenant = f"reserve-{uuid.uuid4().hex[:8]}"
    clients = [aioredis.from_url(redis_url) for _ in range(2)]
    try:
        one, two = (RateLimiter(c) for c in clients)
        results = await asyncio.gather(*(
            (one if i % 2 else two).reserve(tenant, None, 100, 30) for i in range(20)
        ), return_exceptions=True)
        assert results.count(30) == 3  # 3 x 30 fit in 100; a fourth would overspend
        assert all(isinstance(r, RateLimited) for r in results if r != 30)
        for _ in range(3):  # each answer used 5 of its 30
            await one.settle(tenant, 100, reserved=30, used=5)
        assert await two.reserve(tenant, None, 100, 80) == 80  # 85 back, shared by both
    finally:
        for c in clients:
            await c.aclose()


@pytest.mark.integration
async def test_redis_debt_outlives_the_old_two_minute_expiry(redis_url: str) -> None:
    """A tenant that went 540 tokens into debt on a 60/min budget waits ~10 minutes: the
    bucket's key must live that long (it used to expire after 120 s, debt forgotten)."""
    import uuid

    import redis.asyncio as aioredis

    tenant = f"debt-{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(redis_url)
    try:
        limiter = RateLimiter(client)
        await limiter.admit(tenant, None, 60)
        await limiter.charge_tokens(tenant, 60, 600)
        ttl = await client.ttl(f"loragate:rl:{tenant}:t")
        assert ttl >= 590, ttl  # until the debt is repaid and the bucket full again
        with pytest.raises(RateLimited) as info:
            await limiter.admit(tenant, None, 60)
        assert info.value.retry_after is not None and info.value.retry_after >= 540
    finally:
        await client.aclose()
