"""The operator's admin routes of issue 16: key listing and expiry, tenant PATCH and delete,
adapter delete with artifact collection, the experiment list and the rollout routes; each
under isolation (a tenant key is 403, another tenant's objects are 404)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from adapters.keys import parse_key
from adapters.storage import object_key
from tests.support.delivery import QUIET_LOOP, services_of, start_rollout, two_versions
from tests.support.gw_helpers import admin, bearer, create_tenant, upload

pytestmark = pytest.mark.unit

NEW_ROUTES = [
    ("GET", "/admin/tenants/{t}/keys", None),
    ("POST", "/admin/tenants/{t}/keys", {"name": "x", "expires_at": "2999-01-01T00:00:00Z"}),
    ("PATCH", "/admin/tenants/{t}", {"requests_per_minute": 5}),
    ("DELETE", "/admin/tenants/{t}", None),
    ("DELETE", "/admin/tenants/{t}/adapters/support", None),
    ("GET", "/admin/tenants/{t}/experiments", None),
    ("PUT", "/admin/tenants/{t}/adapters/support/rollout", {"version": 2}),
    ("GET", "/admin/tenants/{t}/adapters/support/rollout", None),
    ("DELETE", "/admin/tenants/{t}/adapters/support/rollout", None),
]


@pytest.fixture
def gw_settings_overrides() -> dict[str, Any]:
    return QUIET_LOOP  # no decision round of its own: the tests run them


async def call(client: AsyncTestClient[Any], method: str, path: str, body: Any,
               headers: dict[str, str]) -> Any:
    return await client.request(method, path, json=body, headers=headers)


def stored(client: AsyncTestClient[Any], directory: Path) -> Path:
    sha = hashlib.sha256((directory / "adapter_model.safetensors").read_bytes()).hexdigest()
    return services_of(client).settings.artifacts_dir / object_key(sha)


async def test_each_new_route_refuses_a_tenant_key_and_finds_no_other_tenants_objects(
    gw: AsyncTestClient[Any], peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    key_a = await two_versions(gw, "acme", peft_adapter, peft_adapter_v2)
    key_b = await create_tenant(gw, "beta")
    for method, path, body in NEW_ROUTES:
        for key in (key_a, key_b):
            response = await call(gw, method, path.format(t="acme"), body, bearer(key))
            assert response.status_code == 403, (method, path)
        # Tenant beta has no adapter `support` and no rollout: acme's are not found under it.
        if "support" in path:
            response = await call(gw, method, path.format(t="beta"), body, admin())
            assert response.status_code == 404, (method, path)
        response = await call(gw, method, path.format(t="nobody"), body, admin())
        assert response.status_code == 404, (method, path)
    # Nothing of acme changed through those calls.
    listed = (await gw.get("/admin/tenants/acme/adapters", headers=admin())).json()
    assert [v["version"] for v in listed[0]["versions"]] == [1, 2]
    beta_keys = (await gw.get("/admin/tenants/beta/keys", headers=admin())).json()
    assert [k["name"] for k in beta_keys] == ["ci"]


async def test_keys_are_listed_without_secrets_and_expire(gw: AsyncTestClient[Any]) -> None:
    key = await create_tenant(gw, "acme")
    soon = datetime.now(UTC) + timedelta(minutes=5)
    created = await gw.post("/admin/tenants/acme/keys", headers=admin(),
                            json={"name": "temp", "expires_at": soon.isoformat()})
    assert created.status_code == 201, created.text
    temp = created.json()
    assert datetime.fromisoformat(temp["expires_at"]) == soon
    listed = (await gw.get("/admin/tenants/acme/keys", headers=admin())).json()
    assert [k["name"] for k in listed] == ["ci", "temp"]
    for item in listed:
        assert set(item) == {"id", "name", "prefix", "created_at", "expires_at", "revoked_at"}
        assert item["prefix"] in (key + temp["key"]) and item["prefix"] not in ("", None)
    text = str(listed)
    # The secret is everything after the prefix: it may hold "_" itself (urlsafe base64), so
    # rsplit could find a tail of a letter or two that any listing contains (a flaky run).
    secrets_ = [parse_key(k)[1] for k in (key, temp["key"])]  # type: ignore[index]
    assert all(len(s) >= 32 and s not in text for s in secrets_)
    assert datetime.fromisoformat(listed[1]["expires_at"]) == soon
    assert listed[0]["expires_at"] is None

    for bad in ({"expires_at": "2001-01-01T00:00:00Z"}, {"expires_at": "2999-01-01T00:00:00"},
                {"expires_at": "tomorrow"}):
        response = await gw.post("/admin/tenants/acme/keys", json=bad, headers=admin())
        assert response.status_code == 400, bad

    # Valid now, and cached by auth; expired once the wall clock passes expires_at.
    assert (await gw.get("/v1/models", headers=bearer(temp["key"]))).status_code == 200
    auth = services_of(gw).auth
    auth._wall_clock = lambda: soon + timedelta(seconds=1)  # type: ignore[attr-defined]
    expired = await gw.get("/v1/models", headers=bearer(temp["key"]))
    assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]
    assert (await gw.get("/v1/models", headers=bearer(key))).status_code == 200

    revoked = await gw.delete(f"/admin/keys/{temp['id']}", headers=admin())
    assert revoked.status_code == 204
    listed = (await gw.get("/admin/tenants/acme/keys", headers=admin())).json()
    assert listed[1]["revoked_at"] is not None and listed[0]["revoked_at"] is None


async def test_patch_changes_only_given_limits_and_applies_at_once(
    gw: AsyncTestClient[Any]
) -> None:
    created = await gw.post("/admin/tenants", headers=admin(), json={
        "name": "acme", "requests_per_minute": 600, "tokens_per_minute": 200000})
    assert created.status_code == 201
    key = (await gw.post("/admin/tenants/acme/keys", json={}, headers=admin())).json()["key"]
    body = {"model": "builtin", "prompt": "hi", "max_tokens": 1}
    assert (await gw.post("/v1/completions", json=body, headers=bearer(key))).status_code == 200

    patched = await gw.patch("/admin/tenants/acme", json={"tokens_per_minute": None},
                             headers=admin())
    assert patched.status_code == 200
    assert (patched.json()["requests_per_minute"], patched.json()["tokens_per_minute"]) == \
        (600, None)
    patched = await gw.patch("/admin/tenants/acme", json={"requests_per_minute": 1},
                             headers=admin())
    assert patched.json()["requests_per_minute"] == 1 and patched.json()["tokens_per_minute"] \
        is None
    # The key's cached record carried 600/min: the PATCH must reach it at once.
    statuses = [(await gw.post("/v1/completions", json=body, headers=bearer(key))).status_code
                for _ in range(3)]
    assert 429 in statuses
    for bad in ({"requests_per_minute": "10"}, {"requests_per_minute": 0},
                {"name": "other"}, {"requests_per_minute": True}, [1]):
        response = await gw.patch("/admin/tenants/acme", json=bad, headers=admin())
        assert response.status_code == 400, bad
    unchanged = await gw.patch("/admin/tenants/acme", json={}, headers=admin())
    assert unchanged.json()["requests_per_minute"] == 1


async def test_deleting_a_tenant_revokes_its_keys_and_collects_unshared_artifacts(
    gw: AsyncTestClient[Any], peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    key_a = await two_versions(gw, "acme", peft_adapter, peft_adapter_v2)
    key_b = await create_tenant(gw, "beta")
    assert (await upload(gw, "beta", "mine", peft_adapter)).status_code == 201  # shared bytes
    put = await gw.put("/admin/tenants/acme/experiments/ab", headers=admin(), json={
        "variants": [{"name": "a", "adapter": "support", "weight": 1}]})
    assert put.status_code == 200
    assert (await gw.get("/v1/models", headers=bearer(key_a))).status_code == 200

    assert (await gw.delete("/admin/tenants/acme", headers=admin())).status_code == 204
    assert (await gw.get("/v1/models", headers=bearer(key_a))).status_code == 401
    assert (await gw.get("/admin/tenants/acme", headers=admin())).status_code == 404
    assert not stored(gw, peft_adapter_v2).exists(), "acme's own object is collected"
    assert stored(gw, peft_adapter).exists(), "beta's version still uses this object"
    assert (await gw.get("/v1/models", headers=bearer(key_b))).status_code == 200
    assert (await gw.delete("/admin/tenants/acme", headers=admin())).status_code == 404


async def test_deleting_an_adapter_waits_for_its_experiment_and_rollout(
    gw: AsyncTestClient[Any], peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    await two_versions(gw, "acme", peft_adapter, peft_adapter_v2)
    path = "/admin/tenants/acme/adapters/support"
    put = await gw.put("/admin/tenants/acme/experiments/ab", headers=admin(), json={
        "variants": [{"name": "a", "adapter": "support", "version": 1, "weight": 1}]})
    assert put.status_code == 200
    listed = (await gw.get("/admin/tenants/acme/experiments", headers=admin())).json()
    assert [e["name"] for e in listed] == ["ab"]
    assert (await gw.delete(path, headers=admin())).status_code == 409
    assert (await gw.delete("/admin/tenants/acme/experiments/ab",
                            headers=admin())).status_code == 204
    assert (await gw.get("/admin/tenants/acme/experiments", headers=admin())).json() == []
    await start_rollout(gw, "acme")
    assert (await gw.delete(path, headers=admin())).status_code == 409
    assert (await gw.delete(path + "/rollout", headers=admin())).status_code == 204
    assert (await gw.delete(path, headers=admin())).status_code == 204
    assert (await gw.get("/admin/tenants/acme/adapters", headers=admin())).json() == []
    assert not stored(gw, peft_adapter).exists() and not stored(gw, peft_adapter_v2).exists()
    assert (await gw.delete(path, headers=admin())).status_code == 404
