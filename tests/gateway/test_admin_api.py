"""Admin API flows against a real catalog (SQLite), real storage and real PEFT adapters."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from adapters.db import upgrade_database
from gateway.app import create_app
from gateway.settings import Settings
from tests.support.gw_helpers import (
    admin,
    create_tenant,
    make_settings,
    read_adapter_config,
    upload,
)

pytestmark = pytest.mark.unit


async def test_tenants_create_list_get_and_conflict(client: AsyncTestClient[Any]) -> None:
    created = await client.post(
        "/admin/tenants",
        json={"name": "acme", "requests_per_minute": 600, "tokens_per_minute": 200000},
        headers=admin(),
    )
    assert created.status_code == 201
    assert created.json()["name"] == "acme"
    assert created.json()["requests_per_minute"] == 600
    assert created.json()["tokens_per_minute"] == 200000
    await client.post("/admin/tenants", json={"name": "beta"}, headers=admin())

    listed = await client.get("/admin/tenants", headers=admin())
    assert [t["name"] for t in listed.json()] == ["acme", "beta"]
    got = await client.get("/admin/tenants/beta", headers=admin())
    assert got.status_code == 200 and got.json()["requests_per_minute"] is None

    clash = await client.post("/admin/tenants", json={"name": "acme"}, headers=admin())
    assert clash.status_code == 409
    assert clash.json()["error"]["type"] == "conflict_error"
    missing = await client.get("/admin/tenants/nobody", headers=admin())
    assert missing.status_code == 404


@pytest.mark.parametrize(
    "body",
    [{"name": "Acme"}, {"name": "-acme"}, {"name": "a" * 64}, {"name": "acme", "extra": 1},
     {"name": "acme", "requests_per_minute": 0}, {}],
)
async def test_tenant_create_refuses_bad_bodies(
    client: AsyncTestClient[Any], body: dict[str, Any]
) -> None:
    response = await client.post("/admin/tenants", json=body, headers=admin())
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "code", "param"}
    listed = await client.get("/admin/tenants", headers=admin())
    assert listed.json() == []


async def test_key_is_shown_once_and_works(client: AsyncTestClient[Any]) -> None:
    await client.post("/admin/tenants", json={"name": "acme"}, headers=admin())
    created = await client.post("/admin/tenants/acme/keys", json={"name": "ci"}, headers=admin())
    assert created.status_code == 201
    body = created.json()
    assert body["name"] == "ci" and body["key"].startswith("lg_")
    assert body["id"] and body["key"] not in body["id"]
    for_unknown = await client.post("/admin/tenants/ghost/keys", json={"name": "ci"},
                                    headers=admin())
    assert for_unknown.status_code == 404
    revoked = await client.delete(f"/admin/keys/{body['id']}", headers=admin())
    assert revoked.status_code == 204
    again = await client.delete("/admin/keys/key_doesnotexist", headers=admin())
    assert again.status_code == 404


async def test_upload_real_peft_adapter_is_listed_with_its_metadata(
    client: AsyncTestClient[Any], peft_adapter: Path, settings: Settings
) -> None:
    await create_tenant(client, "acme")
    response = await upload(client, "acme", "support", peft_adapter)
    assert response.status_code == 201, response.text
    version = response.json()

    model_bytes = (peft_adapter / "adapter_model.safetensors").read_bytes()
    peft_config = read_adapter_config(peft_adapter)
    expected = {
        "adapter": "support",
        "version": 1,
        "sha256": hashlib.sha256(model_bytes).hexdigest(),
        "rank": peft_config["r"],
        "alpha": float(peft_config["lora_alpha"]),
        "target_modules": sorted(peft_config["target_modules"]),
        "size_bytes": len(model_bytes),
        "active": True,  # the first version activates itself
    }
    got = {k: version[k] for k in expected}
    got["target_modules"] = sorted(got["target_modules"])
    assert got == expected
    assert version["created_at"].endswith("Z")

    listed = (await client.get("/admin/tenants/acme/adapters", headers=admin())).json()
    assert len(listed) == 1
    assert listed[0]["name"] == "support" and listed[0]["active_version"] == 1
    assert listed[0]["versions"][0]["sha256"] == expected["sha256"]
    assert listed[0]["versions"][0]["size_bytes"] == len(model_bytes)
    assert not any((settings.data_dir / "uploads").iterdir()), "temporary files left behind"


async def test_activate_rollback_and_delete_rules(
    client: AsyncTestClient[Any], peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    await create_tenant(client, "acme")
    assert (await upload(client, "acme", "support", peft_adapter)).status_code == 201
    second = await upload(client, "acme", "support", peft_adapter_v2)
    assert second.status_code == 201
    assert second.json()["version"] == 2 and second.json()["active"] is False
    assert second.json()["rank"] == 4
    assert len(second.json()["target_modules"]) == 7

    promoted = await client.post("/admin/tenants/acme/adapters/support/activate",
                                 json={"version": 2}, headers=admin())
    assert promoted.status_code == 200 and promoted.json()["active_version"] == 2
    in_use = await client.delete("/admin/tenants/acme/adapters/support/versions/2",
                                 headers=admin())
    assert in_use.status_code == 409
    rolled_back = await client.post("/admin/tenants/acme/adapters/support/activate",
                                    json={"version": 1}, headers=admin())
    assert rolled_back.json()["active_version"] == 1
    unknown = await client.post("/admin/tenants/acme/adapters/support/activate",
                                json={"version": 9}, headers=admin())
    assert unknown.status_code == 404

    deleted = await client.delete("/admin/tenants/acme/adapters/support/versions/2",
                                  headers=admin())
    assert deleted.status_code == 204
    listed = (await client.get("/admin/tenants/acme/adapters", headers=admin())).json()
    assert [v["version"] for v in listed[0]["versions"]] == [1]

    activated_on_upload = await upload(client, "acme", "support", peft_adapter_v2,
                                       activate="true")
    assert activated_on_upload.json()["version"] == 3
    assert activated_on_upload.json()["active"] is True


async def test_experiments_crud_and_name_clash(
    client: AsyncTestClient[Any], peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    await create_tenant(client, "acme")
    await upload(client, "acme", "support", peft_adapter)
    await upload(client, "acme", "support", peft_adapter_v2)
    body = {
        "variants": [
            {"name": "control", "adapter": "support", "version": None, "weight": 90},
            {"name": "candidate", "adapter": "support", "version": 2, "weight": 10},
        ],
        "shadow": {"adapter": "support", "version": 1, "sample_rate": 0.1},
    }
    put = await client.put("/admin/tenants/acme/experiments/support-ab", json=body,
                           headers=admin())
    assert put.status_code == 200, put.text
    got = (await client.get("/admin/tenants/acme/experiments/support-ab", headers=admin())).json()
    assert got["name"] == "support-ab"
    assert [(v["name"], v["version"], v["weight"]) for v in got["variants"]] == [
        ("control", None, 90), ("candidate", 2, 10)
    ]
    assert got["shadow"] == {"adapter": "support", "version": 1, "sample_rate": 0.1}
    assert all({"requests", "errors", "p50_latency_ms", "p95_latency_ms", "tokens"}
               <= set(v["figures"]) for v in got["variants"])

    clash = await client.put("/admin/tenants/acme/experiments/support", json=body,
                             headers=admin())
    assert clash.status_code == 409
    in_experiment = await client.delete("/admin/tenants/acme/adapters/support/versions/2",
                                        headers=admin())
    assert in_experiment.status_code == 409
    bad_adapter = await client.put(
        "/admin/tenants/acme/experiments/other",
        json={"variants": [{"name": "a", "adapter": "ghost", "weight": 1}]}, headers=admin(),
    )
    assert bad_adapter.status_code == 404
    deleted = await client.delete("/admin/tenants/acme/experiments/support-ab", headers=admin())
    assert deleted.status_code == 204
    gone = await client.get("/admin/tenants/acme/experiments/support-ab", headers=admin())
    assert gone.status_code == 404
    assert (await client.delete("/admin/tenants/acme/adapters/support/versions/2",
                                headers=admin())).status_code == 204


async def test_upload_over_limit_is_413_and_leaves_nothing(
    tmp_path: Path, base_model_dir: Path, peft_adapter: Path
) -> None:
    model_size = (peft_adapter / "adapter_model.safetensors").stat().st_size
    settings = make_settings(tmp_path / "data", base_model_dir, max_adapter_bytes=model_size - 1)
    upgrade_database(settings.database_url)
    async with AsyncTestClient(create_app(settings)) as client:
        await create_tenant(client, "acme")
        response = await upload(client, "acme", "support", peft_adapter)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
        listed = await client.get("/admin/tenants/acme/adapters", headers=admin())
        assert listed.json() == []
    assert not any((settings.data_dir / "uploads").iterdir())
    artifacts = settings.artifacts_dir
    assert not artifacts.exists() or not any(p.is_file() for p in artifacts.rglob("*"))


@pytest.mark.parametrize("missing", ["adapter_config", "adapter_model"])
async def test_upload_needs_both_parts(
    client: AsyncTestClient[Any], peft_adapter: Path, missing: str
) -> None:
    from tests.support.gw_helpers import adapter_files

    await create_tenant(client, "acme")
    files = adapter_files(peft_adapter)
    del files[missing]
    response = await client.post("/admin/tenants/acme/adapters/support/versions",
                                 files=files, headers=admin())
    assert response.status_code == 400
    assert missing in response.json()["error"]["message"]


async def test_upload_refuses_pickle_in_place_of_safetensors(
    client: AsyncTestClient[Any], peft_adapter: Path
) -> None:
    import pickle

    await create_tenant(client, "acme")
    payload = pickle.dumps({"lora_A": [1.0, 2.0]})
    files = {
        "adapter_config": ("adapter_config.json",
                           (peft_adapter / "adapter_config.json").read_bytes(), "application/json"),
        "adapter_model": ("adapter_model.bin", payload, "application/octet-stream"),
    }
    response = await client.post("/admin/tenants/acme/adapters/support/versions",
                                 files=files, headers=admin())
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request_error"
    listed = await client.get("/admin/tenants/acme/adapters", headers=admin())
    assert listed.json() == []


async def test_openapi_document_lists_the_admin_api(client: AsyncTestClient[Any]) -> None:
    response = await client.get("/schema/openapi.json", headers=admin())  # any valid token
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in ("/admin/tenants", "/admin/tenants/{tenant}/keys", "/admin/keys/{key_id}",
                 "/admin/tenants/{tenant}/adapters/{adapter}/versions",
                 "/admin/tenants/{tenant}/experiments/{name}", "/healthz", "/readyz"):
        assert path in paths, path
    upload_body = paths["/admin/tenants/{tenant}/adapters/{adapter}/versions"]["post"]
    form = upload_body["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert sorted(form["required"]) == ["adapter_config", "adapter_model"]
    assert response.json()["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_upload_to_a_bad_name_or_unknown_tenant_is_refused_before_the_body(
    client: AsyncTestClient[Any], peft_adapter: Path
) -> None:
    await create_tenant(client, "acme")
    bad_name = await upload(client, "acme", "Bad.Name", peft_adapter)
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "adapter"
    unknown = await upload(client, "ghost", "support", peft_adapter)
    assert unknown.status_code == 404
    listed = await client.get("/admin/tenants/acme/adapters", headers=admin())
    assert listed.json() == []
