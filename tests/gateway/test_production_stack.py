"""The admin API on the production settings: PostgreSQL catalog, Redis, S3 (SeaweedFS)."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from adapters.db import upgrade_database
from adapters.storage import object_key
from gateway.app import create_app
from tests.support.gw_helpers import admin, bearer, create_tenant, make_settings, upload

pytestmark = pytest.mark.integration


async def test_upload_lands_in_s3_and_postgres(
    tmp_path: Path, base_model_dir: Path, peft_adapter: Path, postgres_url: str,
    redis_url: str, s3_server, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # boto3 reads the usual AWS variables itself (API.md); the gateway passes only the rest.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    prefix = f"gateway-{secrets.token_hex(4)}"
    settings = make_settings(
        tmp_path / "data", base_model_dir, database_url=postgres_url, redis_url=redis_url,
        s3_endpoint_url=s3_server.endpoint_url, s3_bucket=s3_server.bucket, s3_prefix=prefix,
    )
    upgrade_database(postgres_url)
    tenant = f"gw-{secrets.token_hex(4)}"  # the session's database is shared with other tests
    async with AsyncTestClient(create_app(settings)) as client:
        key = await create_tenant(client, tenant)
        response = await upload(client, tenant, "support", peft_adapter)
        assert response.status_code == 201, response.text
        sha = hashlib.sha256((peft_adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert response.json()["sha256"] == sha
        listed = await client.get(f"/admin/tenants/{tenant}/adapters", headers=admin())
        assert listed.json()[0]["versions"][0]["sha256"] == sha
        ready = await client.get("/readyz")
        assert ready.json()["catalog"] == "ok"
        assert (await client.get("/admin/tenants", headers=bearer(key))).status_code == 403

    stored = s3_server.client().get_object(Bucket=s3_server.bucket,
                                           Key=f"{prefix}/{object_key(sha)}")
    assert hashlib.sha256(stored["Body"].read()).hexdigest() == sha
    assert not (settings.data_dir / "artifacts").exists(), "S3 mode must not write locally"


def test_serve_refuses_an_unmigrated_shared_database(
    tmp_path: Path, base_model_dir: Path, postgres_url: str
) -> None:
    from adapters.db import run_migrations
    from gateway.cli.serve import prepare_data_dir

    settings = make_settings(tmp_path / "data", base_model_dir, database_url=postgres_url)
    upgrade_database(postgres_url)
    prepare_data_dir(settings)  # at head: starts
    run_migrations(postgres_url, "downgrade", "base")
    try:
        with pytest.raises(SystemExit, match="loragate migrate upgrade"):
            prepare_data_dir(settings)
    finally:
        upgrade_database(postgres_url)  # the session's database is shared with other tests
