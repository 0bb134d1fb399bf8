"""A key revoked on one gateway replica stops working on another within 5 s, through Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from adapters.db import upgrade_database
from gateway.app import build_services, create_app
from tests.support.gw_helpers import admin, bearer, create_tenant, make_settings

REVOCATION_BOUND_S = 5.0


async def status_with(client: AsyncTestClient, token: str) -> int:
    """A tenant key on an admin route: 403 while the key is valid, 401 once it is not."""
    return (await client.get("/admin/tenants", headers=bearer(token))).status_code


@pytest.mark.integration
@pytest.mark.parametrize("path", ["pubsub", "generation"])
async def test_revocation_reaches_a_second_replica_within_5_seconds(
    tmp_path: Path, base_model_dir: Path, redis_url: str, path: str
) -> None:
    # Both replicas share the catalog and Redis. Their key caches would keep a key for an
    # hour: only the Redis broadcast can make replica B notice the revocation in time.
    # Each run leaves replica B one path only: the channel (the counter is read hourly), or
    # the counter (no listener).
    common = {"redis_url": redis_url, "key_cache_ttl_s": 3600.0}
    settings_a = make_settings(tmp_path / "data", base_model_dir, **common)
    settings_b = make_settings(tmp_path / "data", base_model_dir, **common,
                               revocation_check_s=3600.0 if path == "pubsub" else 1.0)
    assert settings_b.effective_key_cache_ttl_s == 3600.0
    upgrade_database(settings_a.database_url)
    services_b = build_services(settings_b)
    if path == "generation":
        services_b.parts = tuple(p for p in services_b.parts if p.name != "auth")
    lookups: list[str] = []
    lookup_key = services_b.catalog.lookup_key

    async def counting_lookup(prefix: str):  # type: ignore[no-untyped-def]
        lookups.append(prefix)
        return await lookup_key(prefix)

    services_b.catalog.lookup_key = counting_lookup  # type: ignore[method-assign]
    async with (
        AsyncTestClient(create_app(settings_a)) as replica_a,
        AsyncTestClient(create_app(settings_b, services_b)) as replica_b,
    ):
        key = await create_tenant(replica_a, "acme")
        created = await replica_a.post("/admin/tenants/acme/keys", json={"name": "doomed"},
                                       headers=admin())
        doomed = created.json()
        assert await status_with(replica_b, doomed["key"]) == 403
        assert await status_with(replica_b, key) == 403
        assert await status_with(replica_b, doomed["key"]) == 403
        assert len(lookups) == 2, "replica B should serve the repeated key from its cache"

        revoked = await replica_a.delete(f"/admin/keys/{doomed['id']}", headers=admin())
        assert revoked.status_code == 204
        revoked_at = time.monotonic()
        status = 403
        while time.monotonic() - revoked_at < REVOCATION_BOUND_S:
            status = await status_with(replica_b, doomed["key"])
            if status == 401:
                break
            await asyncio.sleep(0.1)  # polling until the deadline, not a timing assertion
        assert status == 401, "replica B still accepts a key revoked on replica A"
        # Only the revoked key is refused: the tenant's other key still authenticates on B.
        assert await status_with(replica_b, key) == 403


@pytest.mark.unit
async def test_unreachable_redis_falls_back_to_the_catalog(
    tmp_path: Path, base_model_dir: Path
) -> None:
    # Nothing listens on port 1: every Redis call fails fast. Keys must still be checked
    # (against SQL) and a revocation must still take effect.
    settings = make_settings(tmp_path / "data", base_model_dir,
                             redis_url="redis://127.0.0.1:1/0", key_cache_ttl_s=3600.0)
    upgrade_database(settings.database_url)
    async with AsyncTestClient(create_app(settings)) as client:
        key = await create_tenant(client, "acme")
        assert await status_with(client, key) == 403
        doomed = (await client.post("/admin/tenants/acme/keys", json={}, headers=admin())).json()
        revoked = await client.delete(f"/admin/keys/{doomed['id']}", headers=admin())
        assert revoked.status_code == 204
        assert await status_with(client, doomed["key"]) == 401
        assert await status_with(client, key) == 403
