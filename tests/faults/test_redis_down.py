"""Redis stopped under a running gateway, then started again (empty) on the same port.

One `loragate serve --runtimes <stub>` on the shared PostgreSQL and a private Redis, once
with LORAGATE_RATELIMIT_FAIL_OPEN=true and once with false. While Redis is down:
- keys already used keep working: with Redis unreadable the key cache is bypassed and every
  request checks the key in SQL (so a key revoked meanwhile is refused at once);
- a tenant with a rate limit is let through over its limit (fail open) or answered 429 with
  Retry-After, an OpenAI error body and a message saying the limits cannot be checked (fail
  closed); a tenant without limits is unaffected either way;
- /readyz stays 200: readiness is the catalog and a runtime (API.md), not Redis;
- no request hangs: a refused Redis connection costs milliseconds.
Once Redis is back: both pub/sub listeners (key revocations, catalog changes) are subscribed
again and act on messages published after the restart; rate limits are enforced again;
a key revoked through the admin API is refused within API.md's bound.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapters.db import upgrade_database
from gateway.auth import REVOCATION_CHANNEL
from gateway.inference.resolver import CHANNEL as CATALOG_CHANNEL
from tests.support.fault_procs import Proc, upload, wait_until
from tests.support.gw_helpers import admin, bearer
from tests.support.private_services import PrivateRedis, gateway_on_private_redis

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT_S = 15.0  # per request: a dead Redis must cost an answer, never a hang
REVOCATION_BOUND_S = 5.0  # API.md: a revoked key stops working within 5 seconds
SLACK_S = 5.0  # a loaded 2-core machine: requests themselves may take a while
RPM = 3


@dataclass
class Stack:
    gateway: Proc
    redis: PrivateRedis
    fail_open: bool
    data_dir: Path


@pytest.fixture(params=[True, False], ids=["fail-open", "fail-closed"])
def stack(request: pytest.FixtureRequest, tmp_path: Path, base_model_dir: Path,
          postgres_url: str) -> Iterator[Stack]:
    upgrade_database(postgres_url)
    with ExitStack() as cleanup:
        gateway, redis, data_dir = gateway_on_private_redis(
            cleanup, tmp_path, base_model_dir, postgres_url,
            LORAGATE_RATELIMIT_FAIL_OPEN=str(request.param).lower())
        yield Stack(gateway, redis, request.param, data_dir)


def tenant_with_keys(gateway: str, count: int, **limits: int) -> tuple[str, list[dict]]:
    """A fresh tenant (the session's database is shared) and `count` keys: {"id", "key"}."""
    name = f"redis-{secrets.token_hex(4)}"
    created = httpx.post(f"{gateway}/admin/tenants", json={"name": name, **limits},
                         headers=admin(), timeout=TIMEOUT_S)
    assert created.status_code == 201, created.text
    keys = []
    for i in range(count):
        key = httpx.post(f"{gateway}/admin/tenants/{name}/keys", json={"name": f"k{i}"},
                         headers=admin(), timeout=TIMEOUT_S)
        assert key.status_code == 201, key.text
        keys.append(key.json())
    return name, keys


def complete(gateway: str, key: str, model: str = "builtin") -> httpx.Response:
    return httpx.post(f"{gateway}/v1/completions", headers=bearer(key), timeout=TIMEOUT_S,
                      json={"model": model, "prompt": "hello", "max_tokens": 2})


def assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code, error
    if status in (429, 503):
        assert int(response.headers["retry-after"]) >= 1


def subscribers(redis: PrivateRedis, channel: str) -> int:
    import redis as redis_lib

    client = redis_lib.Redis(port=redis.port, socket_connect_timeout=2, socket_timeout=5)
    try:
        return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))
    except redis_lib.RedisError:
        return 0
    finally:
        client.close()


def publish(redis: PrivateRedis, channel: str, message: str) -> None:
    import redis as redis_lib

    client = redis_lib.Redis(port=redis.port, socket_connect_timeout=2, socket_timeout=5)
    try:
        assert client.publish(channel, message) >= 1, f"nobody listens on {channel}"
    finally:
        client.close()


class OtherReplica:
    """Catalog writes made behind the gateway's back, as another replica would make them,
    but without that replica's Redis broadcast: the test publishes by hand, so only the
    gateway's pub/sub listeners can make it notice before its caches expire."""

    def __init__(self, postgres_url: str, base_model_dir: Path, artifacts: Path) -> None:
        self.postgres_url = postgres_url
        self.base_model_dir = base_model_dir
        self.artifacts = artifacts

    def _run(self, work) -> object:  # work: async (catalog) -> result
        from adapters.base_model import BaseModelSpec
        from adapters.catalog import Catalog
        from adapters.db import create_engine, create_sessionmaker
        from adapters.storage import LocalStore

        async def run() -> object:
            engine = create_engine(self.postgres_url)
            try:
                catalog = Catalog(create_sessionmaker(engine), LocalStore(self.artifacts),
                                  BaseModelSpec.from_config_file(
                                      self.base_model_dir / "config.json"))
                return await work(catalog)
            finally:
                await engine.dispose()

        return asyncio.run(run())

    def upload(self, tenant: str, adapter: str, directory: Path) -> None:
        self._run(lambda c: c.upload_version(tenant, adapter, directory / "adapter_config.json",
                                             directory / "adapter_model.safetensors"))

    def revoke(self, key_id: str) -> None:
        self._run(lambda c: c.revoke_key(key_id))


def test_redis_down_then_back(stack: Stack, postgres_url: str, base_model_dir: Path,
                              peft_adapter: Path) -> None:
    url, redis = stack.gateway.url, stack.redis
    free, (steady, doomed, revoked_after) = tenant_with_keys(url, 3)
    limited, (metered,) = tenant_with_keys(url, 1, requests_per_minute=RPM)
    for key in (steady, doomed, revoked_after, metered):
        served = complete(url, key["key"])
        assert served.status_code == 200, served.text  # verified once: now cached

    redis.stop()
    try:
        for _ in range(3):
            served = complete(url, steady["key"])
            assert served.status_code == 200, served.text
            assert served.json()["choices"][0]["text"]

        # The admin API still revokes (SQL); with the key cache bypassed it takes at once.
        gone = httpx.delete(f"{url}/admin/keys/{doomed['id']}", headers=admin(),
                            timeout=TIMEOUT_S)
        assert gone.status_code == 204, gone.text
        assert_openai_error(complete(url, doomed["key"]), 401, "invalid_api_key")

        over = [complete(url, metered["key"]) for _ in range(RPM + 2)]  # one used before
        if stack.fail_open:
            assert [r.status_code for r in over] == [200] * len(over), over[-1].text
        else:
            for response in over:
                assert_openai_error(response, 429, "rate_limit_exceeded")
                # Whether the tenant is over its limit is unknown: the answer must not say so.
                assert "cannot be checked" in response.json()["error"]["message"]

        ready = httpx.get(f"{url}/readyz", timeout=TIMEOUT_S)
        assert ready.status_code == 200, ready.text
        assert stack.gateway.alive(), stack.gateway.log_tail()
    finally:
        redis.start()  # same port; empty, as after a crash without persistence

    # Both listeners are back on their channels.
    for channel in (REVOCATION_CHANNEL, CATALOG_CHANNEL):
        wait_until(lambda ch=channel: subscribers(redis, ch) >= 1,
                   f"a subscriber on {channel} after the restart", timeout_s=30)

    # Rate limits hold again: once Redis answers, the fresh bucket lets RPM requests pass
    # (a few more if it refilled meanwhile, or if one still failed open), then 429.
    wait_until(lambda: complete(url, metered["key"]).status_code == 200,
               "the limited tenant admitted through Redis again", timeout_s=30)
    statuses = []
    for _ in range(RPM + 3):
        statuses.append(complete(url, metered["key"]))
        if statuses[-1].status_code != 200:
            break
    assert_openai_error(statuses[-1], 429, "rate_limit_exceeded")
    assert "over its rate limit" in statuses[-1].json()["error"]["message"]

    # A catalog change published after the restart drops the cached (negative) resolution.
    assert_openai_error(complete(url, steady["key"], "late"), 404, "model_not_found")
    other = OtherReplica(postgres_url, base_model_dir, stack.data_dir / "artifacts")
    other.upload(free, "late", peft_adapter)
    assert complete(url, steady["key"], "late").status_code == 404  # still cached here
    publish(redis, CATALOG_CHANNEL, free)
    wait_until(lambda: complete(url, steady["key"], "late").status_code == 200,
               "the catalog change heard through Redis", timeout_s=10)

    # A revocation published after the restart clears the key cache (whose TTL is 60 s).
    assert complete(url, steady["key"]).status_code == 200  # cached again
    other.revoke(steady["id"])
    publish(redis, REVOCATION_CHANNEL, "revoked")
    wait_until(lambda: complete(url, steady["key"]).status_code == 401,
               "the revocation heard through Redis",
               timeout_s=REVOCATION_BOUND_S + SLACK_S)

    # And the admin API's own revocation path (generation counter and channel) works again.
    gone = httpx.delete(f"{url}/admin/keys/{revoked_after['id']}", headers=admin(),
                        timeout=TIMEOUT_S)
    assert gone.status_code == 204, gone.text
    wait_until(lambda: complete(url, revoked_after["key"]).status_code == 401,
               "the revoked key refused", timeout_s=REVOCATION_BOUND_S + SLACK_S)
    assert upload(url, free, "after", peft_adapter).status_code == 201
