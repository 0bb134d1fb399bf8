"""The runtime's entry in the Redis registry that gateways read to find runtimes.

docs/internals.md: `loragate:runtime:<url>` holds JSON `{"url", "device", "model",
"max_running", "max_gpu_adapters"}` with a 15 s TTL refreshed every 5 s, deleted on
shutdown. A runtime that dies without deregistering disappears when its TTL runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

KEY_PREFIX = "loragate:runtime:"
TTL_S = 15
HEARTBEAT_S = 5.0

logger = logging.getLogger(__name__)


def runtime_key(url: str) -> str:
    return KEY_PREFIX + url


def redacted(redis_url: str) -> str:
    """The Redis URL without its password, for logs."""
    scheme, sep, rest = redis_url.partition("://")
    if "@" not in rest:
        return redis_url
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


class RuntimeRegistry:
    """Registers one runtime and keeps its key alive until `stop()`.

    A failed heartbeat is logged and retried at the next beat: a Redis blip must not take the
    runtime down, and the key comes back (SET, not EXPIRE) once Redis answers again.
    """

    def __init__(
        self,
        redis_url: str,
        info: dict[str, Any],
        *,
        ttl_s: int = TTL_S,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        if heartbeat_s >= ttl_s:
            raise ValueError("the heartbeat must be shorter than the TTL")
        self.redis_url = redis_url
        self.key = runtime_key(info["url"])
        self.value = json.dumps(info, sort_keys=True)
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Write the key once (raising if Redis is unreachable), then keep it fresh."""
        self._client = aioredis.Redis.from_url(self.redis_url, socket_timeout=self.heartbeat_s)
        try:
            await self._beat()
        except BaseException:
            await self._client.aclose()
            self._client = None
            raise
        logger.info("registered %s in %s", self.key, redacted(self.redis_url))
        self._task = asyncio.create_task(self._heartbeat(), name="runtime-registry-heartbeat")

    async def stop(self) -> None:
        """Stop the heartbeat and delete the key; a Redis failure here is logged, not raised."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is None:
            return
        try:
            await self._client.delete(self.key)
            logger.info("deregistered %s", self.key)
        except RedisError as exc:
            logger.warning("could not deregister %s (its TTL will expire it): %s", self.key, exc)
        finally:
            await self._client.aclose()
            self._client = None

    async def _beat(self) -> None:
        assert self._client is not None
        await self._client.set(self.key, self.value, ex=self.ttl_s)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._beat()
            except (RedisError, OSError) as exc:
                logger.warning("registry heartbeat for %s failed: %s", self.key, exc)


async def list_runtimes(client: aioredis.Redis) -> list[dict[str, Any]]:
    """Every registered runtime's info, for gateways; entries that are not JSON are skipped."""
    found: list[dict[str, Any]] = []
    async for key in client.scan_iter(match=KEY_PREFIX + "*", count=100):
        raw = await client.get(key)
        if raw is None:  # expired between SCAN and GET
            continue
        try:
            info = json.loads(raw)
        except ValueError:
            logger.warning("skipping registry entry %r: not JSON", key)
            continue
        if isinstance(info, dict) and "url" in info:
            found.append(info)
    return sorted(found, key=lambda info: str(info["url"]))
