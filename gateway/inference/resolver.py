"""Model names to what serves them, cached per gateway and invalidated across gateways.

Order (API.md): an experiment of the tenant, an adapter (its active version), `adapter@N`,
the base model's id; anything else is `ModelNotFound` (404 `model_not_found`), with one
message for every unknown name so that another tenant's names cannot be probed.

Every answer, negative ones included, is cached per (tenant, model) for `ttl_s`, in an LRU of
at most `max_entries` (unique unknown names must not grow the gateway without bound). A name
longer than `MAX_MODEL_CHARS` can be no model at all: 404 with no lookup and no entry. The
404's message echoes a name only up to `ECHO_CHARS`. A catalog
change calls `invalidate(tenant)` (the catalog's `on_change` listener, registered by
gateway/app.py), which drops the tenant's entries here and publishes the tenant's name on
`CHANNEL`; every gateway listens and drops them too, so a promote or rollback is seen
everywhere within the pub/sub delay.
The TTL is the safety net for a message lost while a gateway was disconnected; after a
reconnect the whole cache is dropped, since messages may have been missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

from adapters.errors import NotFound
from adapters.views import Resolution
from gateway.errors import ModelNotFound

logger = logging.getLogger("loragate.gateway.resolver")
CHANNEL = "loragate:catalog:changed"
RECONNECT_S = 1.0
# Catalog names are at most 63 characters, `adapter@N` a few more; the base model's id is a
# directory name (at most 255 bytes on the usual file systems).
MAX_MODEL_CHARS = 256
ECHO_CHARS = 80
MAX_ENTRIES = 10_000


def model_not_found(model: str) -> ModelNotFound:
    """The 404 of an unknown model name, echoing at most ECHO_CHARS of it."""
    shown = model if len(model) <= ECHO_CHARS else f"{model[:ECHO_CHARS]}..."
    return ModelNotFound(
        f"The model `{shown}` does not exist or you do not have access to it.", param="model")


class Resolver:
    def __init__(
        self,
        catalog: Any,
        base_model_id: str,
        redis_url: str | None = None,
        *,
        ttl_s: float = 30.0,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.catalog = catalog
        self.base_model_id = base_model_id
        self.redis_url = redis_url
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        # (tenant, model) -> (expires_at, Resolution | None); None: not found. Least recently
        # used first.
        self._cache: OrderedDict[tuple[str, str], tuple[float, Resolution | None]] = (
            OrderedDict())
        # Bumped on every invalidation, so a lookup that raced one does not store stale data.
        self._generation: dict[str, int] = {}
        self._redis: Any = None
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    async def resolve(self, tenant: str, model: str) -> Resolution:
        if len(model) > MAX_MODEL_CHARS:
            return self._answer(None, model)
        now = time.monotonic()
        hit = self._cache.get((tenant, model))
        if hit is not None and hit[0] > now:
            self._cache.move_to_end((tenant, model))
            return self._answer(hit[1], model)
        generation = self._generation.get(tenant, 0)
        try:
            resolution: Resolution | None = await self.catalog.resolve(tenant, model)
        except NotFound:
            resolution = None
        if self._generation.get(tenant, 0) == generation:
            self._cache[(tenant, model)] = (now + self.ttl_s, resolution)
            self._cache.move_to_end((tenant, model))
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return self._answer(resolution, model)

    def _answer(self, resolution: Resolution | None, model: str) -> Resolution:
        if resolution is not None:
            return resolution
        if model == self.base_model_id:  # last in API.md's order: a tenant's names come first
            return Resolution("base")
        raise model_not_found(model)

    def drop(self, tenant: str | None) -> None:
        if tenant is None:
            self._cache.clear()
            for name in self._generation:
                self._generation[name] += 1
            return
        self._generation[tenant] = self._generation.get(tenant, 0) + 1
        for key in [k for k in self._cache if k[0] == tenant]:
            self._cache.pop(key, None)

    async def invalidate(self, tenant: str) -> None:
        """After a catalog change: drop here, then tell every other gateway."""
        self.drop(tenant)
        if self._redis is not None:
            try:
                await self._redis.publish(CHANNEL, tenant)
            except Exception as exc:  # the TTL still bounds how stale the others can be
                logger.warning("could not publish a catalog change: %s", type(exc).__name__)

    # ------------------------------------------------------------------ pub/sub listener

    async def start(self) -> None:
        if self.redis_url is None:
            self.listening.set()
            return
        import redis.asyncio as aioredis

        # A connection of its own without a socket timeout: a subscriber waits indefinitely.
        self._redis = aioredis.from_url(self.redis_url)
        self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._redis is not None:
            await self._redis.aclose()

    async def _listen(self) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self.drop(None)  # anything may have changed while we were not listening
                    self.listening.set()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            data = message["data"]
                            self.drop(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening.clear()
                logger.warning("catalog change channel lost (%s); reconnecting",
                               type(exc).__name__)
                await asyncio.sleep(RECONNECT_S)

