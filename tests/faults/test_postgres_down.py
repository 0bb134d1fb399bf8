"""The catalog's PostgreSQL stopped under a running gateway, then started again.

One `loragate serve --runtimes <stub>` on a private PostgreSQL cluster (and a private Redis,
which keeps verified keys cached for `key_cache_ttl_s`; without Redis the cache is capped
at 4 s). A tenant, a key and an adapter are created and served once, so that the key and
the resolution sit in the gateway's caches. With PostgreSQL stopped (`pg_ctl stop -m fast`):
- that key and model keep being served from the caches (the resolver's 30 s TTL bounds how
  long; the checks run right after the stop);
- anything that needs the catalog is a clean 503 with Retry-After and an OpenAI error body:
  admin reads and writes, a model not resolved yet, a key not verified yet;
- an upload attempted then stores no object; /readyz answers 503 naming the catalog.
With PostgreSQL back, the same gateway process recovers by itself (pool pre-ping): /readyz
is 200 again, admin writes succeed, the next upload is version 2, and the catalog holds
exactly versions 1 and 2 (no row or number left over from the failed attempts).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from adapters.db import upgrade_database
from tests.support.fault_procs import new_tenant, upload, wait_until
from tests.support.gw_helpers import admin, bearer
from tests.support.private_services import PrivatePostgres, gateway_on_private_redis

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT_S = 30.0  # per request: an outage must cost an error answer, never a hang


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
        upgrade_database(pg.url)
        yield pg
    finally:
        pg.close()


@pytest.fixture(scope="module")
def peft_adapter_v2(peft_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same adapter with one weight changed: another sha256, so another object."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("adapters") / "fault-adapter-v2"
    shutil.copytree(peft_adapter, out)
    tensors = load_file(out / "adapter_model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def complete(gateway: str, key: str, model: str) -> httpx.Response:
    return httpx.post(f"{gateway}/v1/completions", headers=bearer(key), timeout=TIMEOUT_S,
                      json={"model": model, "prompt": "hello", "max_tokens": 2})


def assert_unavailable(response: httpx.Response) -> None:
    """A clean 503: Retry-After, OpenAI's error shape, nothing of the driver's message."""
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["type"] == "server_error" and error["code"] == "service_unavailable"
    for leak in ("Traceback", "asyncpg", "SELECT", "127.0.0.1", "Errno"):
        assert leak not in response.text


def stored_objects(artifacts: Path) -> set[str]:
    return {p.name for p in artifacts.rglob("*") if p.is_file()} if artifacts.exists() else set()


async def version_rows(url: str, tenant: str) -> list[tuple[str, int]]:
    """(adapter, number) rows straight from PostgreSQL, past the gateway and its caches."""
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"),
                                 timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT a.name, v.number FROM adapter_versions v"
            " JOIN adapters a ON a.id = v.adapter_id JOIN tenants t ON t.id = a.tenant_id"
            " WHERE t.name = $1 ORDER BY a.name, v.number", tenant)
    finally:
        await conn.close()
    return [(r["name"], r["number"]) for r in rows]


def test_postgres_down_then_back(tmp_path: Path, base_model_dir: Path, peft_adapter: Path,
                                 peft_adapter_v2: Path, postgres: PrivatePostgres) -> None:
    with ExitStack() as stack:
        gateway, _, data_dir = gateway_on_private_redis(stack, tmp_path, base_model_dir,
                                                        postgres.url)
        url = gateway.url
        artifacts = data_dir / "artifacts"

        tenant, key = new_tenant(url)
        spare = httpx.post(f"{url}/admin/tenants/{tenant}/keys", json={"name": "spare"},
                           headers=admin())
        assert spare.status_code == 201, spare.text
        unused_key = spare.json()["key"]
        first = upload(url, tenant, "support", peft_adapter)
        assert first.status_code == 201, first.text
        assert first.json()["version"] == 1
        served = complete(url, key, "support")
        assert served.status_code == 200, served.text
        assert served.headers["x-loragate-adapter"] == "support@1"
        objects_before = stored_objects(artifacts)

        postgres.stop()
        try:
            # Cached key and resolution: still served. First, while the 30 s TTL is young.
            for _ in range(3):
                again = complete(url, key, "support")
                assert again.status_code == 200, again.text
                assert again.headers["x-loragate-adapter"] == "support@1"
                assert again.json()["choices"][0]["text"]

            # Not in any cache: the catalog would have to answer, so 503, not 404/401/500.
            assert_unavailable(complete(url, key, "never-resolved"))
            assert_unavailable(complete(url, unused_key, "support"))

            # Admin reads and writes.
            assert_unavailable(httpx.get(f"{url}/admin/tenants", headers=admin(),
                                         timeout=TIMEOUT_S))
            assert_unavailable(httpx.post(f"{url}/admin/tenants", json={"name": "late"},
                                          headers=admin(), timeout=TIMEOUT_S))
            assert_unavailable(httpx.post(f"{url}/admin/tenants/{tenant}/keys",
                                          json={"name": "late"}, headers=admin(),
                                          timeout=TIMEOUT_S))
            assert_unavailable(upload(url, tenant, "support", peft_adapter_v2))
            assert_unavailable(httpx.post(
                f"{url}/admin/tenants/{tenant}/adapters/support/activate",
                json={"version": 1}, headers=admin(), timeout=TIMEOUT_S))
            assert stored_objects(artifacts) == objects_before, "an upload stored an object"

            ready = httpx.get(f"{url}/readyz", timeout=TIMEOUT_S)
            assert ready.status_code == 503, ready.text
            assert ready.json()["catalog"].startswith("unreachable")
            assert httpx.get(f"{url}/healthz", timeout=TIMEOUT_S).status_code == 200
            assert gateway.alive(), gateway.log_tail()
        finally:
            if not postgres.running():
                postgres.start()

        # The same process, no restart: its pool reconnects by itself.
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=TIMEOUT_S).status_code == 200,
                   "/readyz to recover after PostgreSQL restarted", timeout_s=60)
        created = httpx.post(f"{url}/admin/tenants", json={"name": f"{tenant}-after"},
                             headers=admin(), timeout=TIMEOUT_S)
        assert created.status_code == 201, created.text
        second = upload(url, tenant, "support", peft_adapter_v2)
        assert second.status_code == 201, second.text
        assert second.json()["version"] == 2
        pinned = complete(url, key, "support@2")
        assert pinned.status_code == 200, pinned.text
        assert pinned.headers["x-loragate-adapter"] == "support@2"
        assert complete(url, unused_key, "support").status_code == 200

        listed = httpx.get(f"{url}/admin/tenants/{tenant}/adapters", headers=admin(),
                           timeout=TIMEOUT_S).json()
        assert [v["version"] for v in listed[0]["versions"]] == [1, 2]
        assert listed[0]["active_version"] == 1
        assert asyncio.run(version_rows(postgres.url, tenant)) == [("support", 1),
                                                                  ("support", 2)]
        # The failed upload left nothing; the good one added its safetensors (the config
        # is byte-identical to version 1's, so the same object).
        assert stored_objects(artifacts) == objects_before | {second.json()["sha256"]}
