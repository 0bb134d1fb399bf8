"""The artifact store (a private SeaweedFS) goes down under a running gateway and runtime.

Adapter A has been served once, so the runtime holds it; adapter B was uploaded but never
served, and the runtime is a fresh process that has fetched A only (`loragate runtime` has
no disk tier, so B is on no local disk either; the test checks the runtime's load count).
With the store down: A and the base model keep serving; B fails within its request with an
OpenAI-shaped 503 naming the adapter and the store, not a 500 and not a hang; an upload
gets a 503 and leaves no catalog row. With the store back on the same ports and data: B
serves and uploads work again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.support.fault_procs import (
    catalog_rows,
    listed_adapters,
    new_tenant,
    s3_env,
    start_gateway,
    start_runtimes,
    upload,
    wait_until,
)
from tests.support.gw_helpers import bearer, make_peft_adapter

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PREFIX = "store-down"


@pytest.fixture(scope="module")
def more_adapters(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[Path, Path]:
    """Two adapters whose bytes differ from `peft_adapter`'s (other seeds)."""
    root = tmp_path_factory.mktemp("store-down-adapters")
    b, c = (make_peft_adapter(base_model_dir, root / f"seed{seed}", rank=8, alpha=16,
                              target_modules=["q_proj", "v_proj"], seed=seed)
            for seed in (1, 2))
    return b, c


def test_store_down_and_back(tmp_path: Path, base_model_dir: Path, peft_adapter: Path,
                             more_adapters: tuple[Path, Path], seaweedfs) -> None:
    adapter_b, adapter_c = more_adapters
    s3 = seaweedfs.server
    env = s3_env(s3, PREFIX)
    data_dir = tmp_path / "data"

    def stored_objects() -> int:
        listing = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"{PREFIX}/")
        return int(listing.get("KeyCount", 0))

    with ExitStack() as stack:
        (runtime,) = start_runtimes(base_model_dir, [tmp_path / "runtime.log"], **env)
        stack.callback(runtime.stop)
        gateway = start_gateway(data_dir, base_model_dir, [runtime.url],
                                tmp_path / "gateway.log", **env)
        stack.callback(gateway.stop)
        wait_until(lambda: httpx.get(f"{gateway.url}/readyz").status_code == 200,
                   "the gateway to be ready", timeout_s=60)
        tenant, key = new_tenant(gateway.url)

        def complete(model: str) -> httpx.Response:
            return httpx.post(f"{gateway.url}/v1/completions", headers=bearer(key), timeout=60,
                              json={"model": model, "prompt": "hi", "max_tokens": 4})

        for name, directory in (("a", peft_adapter), ("b", adapter_b)):
            uploaded = upload(gateway.url, tenant, name, directory)
            assert uploaded.status_code == 201, uploaded.text
        objects = stored_objects()
        served = complete("a")
        assert served.status_code == 200, served.text
        assert served.headers["x-loragate-adapter"] == "a@1"
        # The runtime fetched A and nothing else: B is on none of its tiers, disk included.
        assert httpx.get(f"{runtime.url}/stats").json()["adapters"]["loads"] == 1

        seaweedfs.stop()

        # The same window: A (resident) and the base model are unaffected; cold B fails.
        with ThreadPoolExecutor(3) as pool:
            cold, warm, base = pool.map(complete, ["b", "a", "builtin"])
        assert warm.status_code == 200, warm.text
        assert warm.headers["x-loragate-adapter"] == "a@1"
        assert base.status_code == 200, base.text
        assert cold.status_code in (502, 503), cold.text
        error = cold.json()["error"]
        assert set(error) == {"message", "type", "code", "param"}
        assert error["code"] == "adapter_load_failed" and error["type"] == "server_error"
        assert "b@1" in error["message"] and "artifact store" in error["message"], error
        # Where the store is stays with the operators: no endpoint, bucket or object key.
        for internal in (s3.endpoint_url, "127.0.0.1", s3.bucket, PREFIX, "s3://"):
            assert internal not in error["message"], error
        assert int(cold.headers["retry-after"]) >= 1
        assert complete("a").status_code == 200  # still, after B's failure
        # Streamed, B's failure comes before any token, so before the status line: the same
        # status, Retry-After and sanitized body as the whole answer (issue 12, finding 7).
        streamed = httpx.post(f"{gateway.url}/v1/completions", headers=bearer(key), timeout=60,
                              json={"model": "b", "prompt": "hi", "max_tokens": 4,
                                    "stream": True})
        assert streamed.status_code == cold.status_code, streamed.text
        assert streamed.headers["content-type"].startswith("application/json")
        assert int(streamed.headers["retry-after"]) >= 1
        streamed_error = streamed.json()["error"]
        assert streamed_error["code"] == "adapter_load_failed"
        assert streamed_error["message"] == error["message"]

        refused = upload(gateway.url, tenant, "c", adapter_c)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "server_error"
        assert int(refused.headers["retry-after"]) >= 1
        assert listed_adapters(gateway.url, tenant) == {"a": [1], "b": [1]}
        assert catalog_rows(data_dir / "catalog.db", tenant) == [("a", 1), ("b", 1)]
        assert not any((data_dir / "uploads").iterdir())

        seaweedfs.start()  # same ports, credentials and data dir
        assert stored_objects() == objects  # nothing was written while it was down

        # B serves now. Polled: the runtime remembers a failed load for a moment so that a
        # flood of requests does not hammer a store that is down; far less than a minute.
        back = wait_until(lambda: (r := complete("b")).status_code == 200 and r,
                          "adapter B to serve after the store came back", timeout_s=20,
                          interval_s=0.5)
        assert back.headers["x-loragate-adapter"] == "b@1"
        again = upload(gateway.url, tenant, "c", adapter_c)
        assert again.status_code == 201, again.text
        assert again.json()["version"] == 1
        assert stored_objects() == objects + 1  # C's safetensors (configs are identical)
        assert complete("c").status_code == 200
        assert gateway.alive() and runtime.alive()
    assert '" 500' not in gateway.log_tail(100_000), gateway.log_tail()
