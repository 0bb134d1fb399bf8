"""Bearer auth: 401 for missing/malformed/unknown/revoked keys, 403 for tenant keys on admin
routes (every one of them, read from the app), the key cache and its expiry."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from adapters.db import upgrade_database
from gateway.app import build_services
from gateway.auth import Authenticator
from gateway.errors import Unauthorized
from tests.support.gw_helpers import ADMIN_TOKEN, admin, bearer, create_tenant, make_settings

pytestmark = pytest.mark.unit

PATH_VALUES = {"tenant": "acme", "adapter": "support", "version": "1", "name": "exp",
               "key_id": "key_0000000000000000"}


def admin_endpoints(client: AsyncTestClient[Any]) -> list[tuple[str, str]]:
    """(method, concrete path) of every admin route the app serves."""
    endpoints = []
    for route in client.app.routes:
        if not route.path.startswith("/admin"):
            continue
        path = re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: PATH_VALUES[m.group(1)], route.path)
        for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
            endpoints.append((method, path))
    return endpoints


async def test_every_admin_route_refuses_tenant_keys_and_anonymous_calls(
    client: AsyncTestClient[Any],
) -> None:
    key = await create_tenant(client, "acme")
    endpoints = admin_endpoints(client)
    assert len(endpoints) >= 11  # the admin table of API.md
    for method, path in endpoints:
        as_tenant = await client.request(method, path, headers=bearer(key), json={})
        assert as_tenant.status_code == 403, (method, path, as_tenant.text)
        assert as_tenant.json()["error"]["type"] == "permission_error"
        anonymous = await client.request(method, path, json={})
        assert anonymous.status_code == 401, (method, path)
        wrong_admin = await client.request(method, path, headers=bearer("not-the-token"),
                                           json={})
        assert wrong_admin.status_code == 401, (method, path)


@pytest.mark.parametrize(
    "authorization",
    ["", "Bearer", "Bearer ", "Basic YWRtaW46YWRtaW4=", "lg_0123456789ab_secret",
     "Bearer lg_nothex______0_secret", "Bearer lg_0123456789ab_", "Bearer " + "x" * 600],
)
async def test_malformed_authorization_is_401(
    client: AsyncTestClient[Any], authorization: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await client.get("/admin/tenants", headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"


async def test_unknown_wrong_and_revoked_tenant_keys_are_401(
    client: AsyncTestClient[Any],
) -> None:
    key = await create_tenant(client, "acme")
    prefix = key.split("_")[1]
    assert (await client.get("/admin/tenants", headers=bearer(key))).status_code == 403
    wrong_secret = f"lg_{prefix}_{'A' * 43}"
    assert (await client.get("/admin/tenants", headers=bearer(wrong_secret))).status_code == 401
    unknown_prefix = f"lg_{'0' * 12}_{key.split('_', 2)[2]}"
    assert (await client.get("/admin/tenants", headers=bearer(unknown_prefix))).status_code == 401

    keys = await client.post("/admin/tenants/acme/keys", json={"name": "other"}, headers=admin())
    other_key = keys.json()["key"]
    key_id = (await client.post("/admin/tenants/acme/keys", json={}, headers=admin())).json()
    revoked = await client.delete(f"/admin/keys/{key_id['id']}", headers=admin())
    assert revoked.status_code == 204
    # The revoking replica forgets its cache at once: the revoked key fails on the next call,
    # and the other keys of the tenant keep working.
    assert (await client.get("/admin/tenants", headers=bearer(key_id["key"]))).status_code == 401
    assert (await client.get("/admin/tenants", headers=bearer(other_key))).status_code == 403
    assert (await client.get("/admin/tenants", headers=bearer(key))).status_code == 403


async def test_admin_token_works_and_is_compared_whole(client: AsyncTestClient[Any]) -> None:
    assert (await client.get("/admin/tenants", headers=admin())).status_code == 200
    for near in (ADMIN_TOKEN[:-1], ADMIN_TOKEN + "x", ADMIN_TOKEN.upper()):
        assert (await client.get("/admin/tenants", headers=bearer(near))).status_code == 401


async def test_cached_key_expires_without_redis_so_other_replicas_revocations_land(
    tmp_path: Path, base_model_dir: Path
) -> None:
    """Without Redis a replica cannot hear of another's revocation: its cache must expire
    within 5 s. The revocation here goes straight to the catalog, as another replica would."""
    settings = make_settings(tmp_path / "data", base_model_dir, key_cache_ttl_s=3600.0)
    upgrade_database(settings.database_url)
    services = build_services(settings)
    try:
        catalog = services.catalog
        await catalog.create_tenant("acme", requests_per_minute=60, tokens_per_minute=5000)
        view, key = await catalog.create_key("acme", "ci")
        now = [1000.0]
        auth = Authenticator(catalog, None, None,
                             cache_ttl_s=settings.effective_key_cache_ttl_s,
                             revocation_check_s=1.0, clock=lambda: now[0])
        principal = await auth.authenticate_tenant(key)
        assert (principal.tenant, principal.key_id) == ("acme", view.id)
        assert (principal.requests_per_minute, principal.tokens_per_minute) == (60, 5000)
        await catalog.revoke_key(view.id)
        now[0] += 1.0
        assert (await auth.authenticate_tenant(key)).tenant == "acme"  # served from cache
        now[0] += settings.effective_key_cache_ttl_s
        assert settings.effective_key_cache_ttl_s < 5.0
        with pytest.raises(Unauthorized):
            await auth.authenticate_tenant(key)
    finally:
        await services.close()


async def test_no_admin_token_configured_means_admin_api_is_closed(
    tmp_path: Path, base_model_dir: Path
) -> None:
    from gateway.app import create_app

    settings = make_settings(tmp_path / "data", base_model_dir, admin_token=None)
    upgrade_database(settings.database_url)
    async with AsyncTestClient(create_app(settings)) as client:
        assert (await client.get("/admin/tenants", headers=admin())).status_code == 401
        assert (await client.get("/admin/tenants", headers=bearer(""))).status_code == 401
