"""Bearer authentication: the admin token, tenant keys, and the guards that use them.

Tenant keys look like `lg_<prefix>_<secret>`. The catalog finds a key by its prefix and
stores only sha256(secret); we compare digests with `hmac.compare_digest`. Verified key
records are cached in-process so that the hot path does not hit SQL on every request.

Revocation reaches every replica quickly, by two paths through Redis: the replica that
revokes a key clears its own cache, increments a generation counter and publishes on a
channel. Every replica listens on that channel and clears its cache on each message (at
once); and since a pub/sub message is lost while a listener reconnects, every replica also
re-reads the counter at most `revocation_check_s` after it last did (1 s by default) and
clears its cache when it moved. Either path alone keeps the promise of API.md (5 s).
Without Redis, replicas cannot hear of each other, so cached keys expire within 4 s instead
(Settings.effective_key_cache_ttl_s). If Redis cannot be read, the cache is bypassed and
every request checks SQL: slower, never wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from redis.exceptions import RedisError

from adapters.keys import hash_secret, parse_key, verify_secret
from adapters.views import KeyRecord
from gateway.errors import Forbidden, Unauthorized
from gateway.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from adapters.catalog import Catalog

logger = logging.getLogger("loragate.gateway.auth")

REVOCATION_GENERATION_KEY = "loragate:auth:revocation-generation"
REVOCATION_CHANNEL = "loragate:auth:revocations"
LISTEN_POLL_S = 1.0
RECONNECT_DELAY_S = 1.0
MAX_TOKEN_CHARS = 512
MAX_CACHED_KEYS = 10_000
ADMIN_TOKEN_BYTES = 32
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class TenantPrincipal:
    """Who a tenant request comes from; set on `connection.state.tenant` by require_tenant."""

    tenant: str
    key_id: str
    # The tenant's limits as of the key lookup (cached with it), for the rate limiter.
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(slots=True)
class _CachedKey:
    record: KeyRecord
    fetched_at: float


class Authenticator:
    def __init__(
        self,
        catalog: Catalog,
        admin_token_sha256: str | None,
        redis: Redis | None,
        cache_ttl_s: float,
        revocation_check_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._catalog = catalog
        self._admin_sha256 = admin_token_sha256
        self._redis = redis
        self._cache_ttl_s = cache_ttl_s
        self._revocation_check_s = revocation_check_s
        self._clock = clock
        self._wall_clock = wall_clock  # key expiry is a wall-clock instant
        self._cache: dict[str, _CachedKey] = {}
        self._generation: bytes | str | None = None
        self._generation_read_at = float("-inf")
        self._cleared_at = float("-inf")
        self._listener: asyncio.Task[None] | None = None

    def is_admin(self, token: str) -> bool:
        if self._admin_sha256 is None:
            return False
        return hmac.compare_digest(hash_secret(token), self._admin_sha256)

    async def authenticate_tenant(self, token: str) -> TenantPrincipal:
        parts = parse_key(token)
        if parts is None:
            raise Unauthorized("malformed API key: expected lg_<prefix>_<secret>")
        prefix, secret = parts
        record = await self._record(prefix)
        if record is None or not verify_secret(secret, record.secret_hash):
            raise Unauthorized("invalid API key")
        if record.revoked:
            raise Unauthorized("this API key has been revoked")
        # A cached record outlives the lookup that found the key unexpired.
        if record.expired(self._wall_clock()):
            raise Unauthorized("this API key has expired")
        return TenantPrincipal(
            tenant=record.tenant,
            key_id=str(record.key_id),
            requests_per_minute=record.requests_per_minute,
            tokens_per_minute=record.tokens_per_minute,
        )

    async def key_revoked(self) -> None:
        """Call after the catalog revoked a key, deleted a tenant or changed its limits (which
        cached key records carry): forget cached keys here and everywhere."""
        self._clear()
        if self._redis is None:
            return
        try:
            await self._redis.incr(REVOCATION_GENERATION_KEY)
            await self._redis.publish(REVOCATION_CHANNEL, b"revoked")
        except RedisError:
            # The revocation itself is committed in SQL; other replicas notice it when their
            # cached entries expire, or at once when they cannot read Redis either.
            logger.warning("could not broadcast a key revocation through Redis", exc_info=True)

    async def start(self) -> None:
        """Start listening for revocations published by any replica (with Redis only)."""
        if self._redis is not None and self._listener is None:
            self._listener = asyncio.create_task(self._listen(self._redis))

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    async def _listen(self, redis: Redis) -> None:
        while True:
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(REVOCATION_CHANNEL)
                    # Whatever was published while we were not subscribed is lost.
                    self._clear()
                    while True:
                        # A bounded wait: the client's socket timeout must not fire here.
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=LISTEN_POLL_S
                        )
                        if message is not None and message.get("type") == "message":
                            self._clear()
            except Exception:  # a background loop: log whatever broke it, then reconnect
                logger.warning("revocation listener lost Redis; reconnecting", exc_info=True)
                await asyncio.sleep(RECONNECT_DELAY_S)

    async def _record(self, prefix: str) -> KeyRecord | None:
        now = self._clock()
        cached = self._cache.get(prefix)
        if cached is not None and now - cached.fetched_at < self._cache_ttl_s:
            if await self._cache_is_fresh(now):
                cached = self._cache.get(prefix)  # the freshness check may have cleared it
                if cached is not None:
                    return cached.record
        started = self._clock()
        record = await self._catalog.lookup_key(prefix)
        # An entry whose lookup began before the last clear may predate a revocation.
        if record is not None and started > self._cleared_at:
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[prefix] = _CachedKey(record, started)
        return record

    async def _cache_is_fresh(self, now: float) -> bool:
        if self._redis is None or now - self._generation_read_at <= self._revocation_check_s:
            return True
        try:
            generation = await self._redis.get(REVOCATION_GENERATION_KEY)
        except RedisError:
            logger.warning("Redis unreachable; checking API keys against the catalog")
            self._clear()
            return False
        if generation != self._generation:
            self._clear()
            self._generation = generation
        self._generation_read_at = now
        return True

    def _clear(self) -> None:
        self._cache.clear()
        self._cleared_at = self._clock()


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    header = connection.headers.get("authorization")
    if not header:
        raise Unauthorized("missing Authorization header; expected 'Bearer <token>'")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
        raise Unauthorized("malformed Authorization header; expected 'Bearer <token>'")
    return token


def _authenticator(connection: ASGIConnection[Any, Any, Any, Any]) -> Authenticator:
    auth: Authenticator = connection.app.state.services.auth
    return auth


async def require_admin(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard: the admin token, else 403 for a valid tenant key, else 401."""
    token = bearer_token(connection)
    auth = _authenticator(connection)
    if auth.is_admin(token):
        return
    if parse_key(token) is not None:
        await auth.authenticate_tenant(token)  # 401 when it is no valid key either
        raise Forbidden("this route takes the admin token, not a tenant key")
    raise Unauthorized("invalid admin token")


async def require_tenant(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard: a valid tenant key; sets `connection.state.tenant` to its TenantPrincipal."""
    token = bearer_token(connection)
    connection.state.tenant = await _authenticator(connection).authenticate_tenant(token)


async def require_any_token(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard of /schema (API.md: "takes any valid token"): the admin token or a valid tenant
    key, else 401."""
    token = bearer_token(connection)
    auth = _authenticator(connection)
    if not auth.is_admin(token):
        await auth.authenticate_tenant(token)


def tenant_of(connection: ASGIConnection[Any, Any, Any, Any]) -> TenantPrincipal:
    principal: TenantPrincipal = connection.state.tenant
    return principal


def load_admin_token_sha256(settings: Settings) -> str | None:
    """The admin token's sha256: of LORAGATE_ADMIN_TOKEN, else from the data dir's hash file.

    None means no admin token is configured: every admin call answers 401.
    """
    if settings.admin_token:
        return hash_secret(settings.admin_token)
    path = settings.admin_token_hash_path
    try:
        stored = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    if len(stored) != 64 or not set(stored) <= _HEX:
        raise ValueError(f"{path} does not hold a sha256 hex digest")
    return stored


def ensure_admin_token(settings: Settings) -> str | None:
    """On first start without LORAGATE_ADMIN_TOKEN, make a token and store only its hash.

    Returns the new plaintext token (for the caller to show once), or None when the token
    comes from the environment or was made on an earlier start.
    """
    if settings.admin_token or settings.admin_token_hash_path.exists():
        return None
    token = secrets.token_urlsafe(ADMIN_TOKEN_BYTES)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # O_EXCL: two first starts racing must not both think they made the token.
    fd = os.open(settings.admin_token_hash_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(hash_secret(token) + "\n")
    return token
