"""The Redis registry against a real Redis: key, value, TTL, refresh, delete, listing."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from runtime.http.registry import KEY_PREFIX, RuntimeRegistry, list_runtimes, redacted, runtime_key

INFO = {"url": "http://10.0.0.7:8100", "device": "cpu", "model": "builtin",
        "max_running": 64, "max_gpu_adapters": 8}


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


@pytest.mark.unit
def test_key_and_redaction() -> None:
    assert runtime_key("http://h:1") == "loragate:runtime:http://h:1"
    assert redacted("redis://user:s3cret@redis:6379/0") == "redis://***@redis:6379/0"
    assert "s3cret" not in redacted("rediss://:s3cret@r/1")
    assert redacted("redis://127.0.0.1:6379/15") == "redis://127.0.0.1:6379/15"
    with pytest.raises(ValueError):
        RuntimeRegistry("redis://x", INFO, ttl_s=5, heartbeat_s=5)


@pytest.mark.integration
async def test_register_refresh_and_deregister(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    registry = RuntimeRegistry(redis_url, INFO)  # the contract's 15 s TTL, 5 s heartbeat
    try:
        await registry.start()
        key = "loragate:runtime:http://10.0.0.7:8100"
        assert json.loads(await client.get(key)) == INFO
        assert 10 < await client.ttl(key) <= 15
        assert await list_runtimes(client) == [INFO]
        await registry.stop()
        assert await client.exists(key) == 0
        assert await list_runtimes(client) == []
    finally:
        await registry.stop()
        await client.aclose()


@pytest.mark.integration
async def test_heartbeat_brings_the_key_back(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    registry = RuntimeRegistry(redis_url, INFO, ttl_s=3, heartbeat_s=0.1)
    key = runtime_key(INFO["url"])
    try:
        await registry.start()
        await client.delete(key)  # as if the TTL ran out or Redis restarted empty

        async def back() -> bool:
            return await client.exists(key) == 1

        await wait_until(back)
        assert 0 < await client.ttl(key) <= 3
    finally:
        await registry.stop()
        await client.aclose()


@pytest.mark.integration
async def test_listing_skips_garbage_entries(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set(KEY_PREFIX + "http://b:1", json.dumps({**INFO, "url": "http://b:1"}))
        await client.set(KEY_PREFIX + "http://a:1", json.dumps({**INFO, "url": "http://a:1"}))
        await client.set(KEY_PREFIX + "junk", b"not json")
        await client.set("other:key", json.dumps(INFO))
        assert [i["url"] for i in await list_runtimes(client)] == ["http://a:1", "http://b:1"]
    finally:
        await client.aclose()


@pytest.mark.unit
async def test_unreachable_redis_fails_start_loudly() -> None:
    registry = RuntimeRegistry("redis://127.0.0.1:1/0", INFO)
    with pytest.raises(Exception) as excinfo:
        await registry.start()
    assert "Connect" in type(excinfo.value).__name__ or isinstance(excinfo.value, OSError)
    await registry.stop()  # a no-op, and must not raise
