"""Two gateway processes, two runtime processes (stubs), PostgreSQL and Redis.

A promote through one gateway is served by the other within 5 s; a tenant's rate limit
holds exactly across both; A/B users keep their variant on either gateway and the figures
are shared; a runtime killed mid-traffic costs only the stream it was serving.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapters.db import upgrade_database
from tests.support.gw_helpers import ADMIN_TOKEN, adapter_files, admin, bearer
from tests.support.stub_procs import start_gateway, start_stub, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class Cluster:
    gateways: list[str]
    runtimes: list[str]
    runtime_procs: list


@pytest.fixture
def cluster(tmp_path: Path, base_model_dir: Path, postgres_url: str, redis_url: str
            ) -> Iterator[Cluster]:
    upgrade_database(postgres_url)
    procs, gateway_procs = [], []
    try:
        for _ in range(2):
            proc, url = start_stub(token_delay_ms=30)
            procs.append((proc, url))
        env = {"LORAGATE_DATABASE_URL": postgres_url, "LORAGATE_REDIS_URL": redis_url}
        for _ in range(2):
            gateway_procs.append(start_gateway(tmp_path / "data", base_model_dir,
                                               [u for _, u in procs], ADMIN_TOKEN, **env))
        yield Cluster([u for _, u in gateway_procs], [u for _, u in procs], [p for p, _ in procs])
    finally:
        for proc, _ in gateway_procs + procs:
            stop(proc)


def new_tenant(gateway: str, **limits: int) -> tuple[str, str]:
    name = f"mp-{secrets.token_hex(4)}"
    assert httpx.post(f"{gateway}/admin/tenants", json={"name": name, **limits},
                      headers=admin()).status_code == 201
    key = httpx.post(f"{gateway}/admin/tenants/{name}/keys", json={"name": "ci"},
                     headers=admin()).json()["key"]
    return name, str(key)


def upload(gateway: str, tenant: str, adapter: str, directory: Path, **params: str) -> None:
    response = httpx.post(f"{gateway}/admin/tenants/{tenant}/adapters/{adapter}/versions",
                          files=adapter_files(directory), params=params, headers=admin(),
                          timeout=30)
    assert response.status_code == 201, response.text


def complete(gateway: str, key: str, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": "hello", "max_tokens": 1, **extra}
    return httpx.post(f"{gateway}/v1/completions", json=body, headers=bearer(key), timeout=30)


def test_promote_on_one_gateway_is_seen_by_the_other_within_5s(
    cluster: Cluster, peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    one, two = cluster.gateways
    tenant, key = new_tenant(one)
    upload(one, tenant, "support", peft_adapter)
    assert complete(two, key, "support").headers["x-loragate-adapter"] == "support@1"
    upload(one, tenant, "support", peft_adapter_v2)
    promoted = time.monotonic()
    assert httpx.post(f"{one}/admin/tenants/{tenant}/adapters/support/activate",
                      json={"version": 2}, headers=admin()).status_code == 200
    while complete(two, key, "support").headers["x-loragate-adapter"] != "support@2":
        assert time.monotonic() - promoted < 5.0, "the other gateway still serves version 1"
    httpx.post(f"{two}/admin/tenants/{tenant}/adapters/support/activate",
               json={"version": 1}, headers=admin())
    rolled_back = time.monotonic()
    while complete(one, key, "support").headers["x-loragate-adapter"] != "support@1":
        assert time.monotonic() - rolled_back < 5.0, "the rollback did not reach gateway one"


def test_rate_limit_holds_exactly_across_both_gateways(cluster: Cluster) -> None:
    tenant, key = new_tenant(cluster.gateways[0], requests_per_minute=8)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: complete(cluster.gateways[i % 2], key, "builtin"),
                                range(24)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 8 + [429] * 16
    limited = [a for a in answers if a.status_code == 429]
    assert all(int(a.headers["retry-after"]) >= 1 for a in limited)
    assert all(a.json()["error"]["type"] == "rate_limit_error" for a in limited)


def test_ab_users_keep_their_variant_across_gateways_and_figures_are_shared(
    cluster: Cluster, peft_adapter: Path, peft_adapter_v2: Path
) -> None:
    one, two = cluster.gateways
    tenant, key = new_tenant(one)
    upload(one, tenant, "a", peft_adapter)
    upload(one, tenant, "b", peft_adapter_v2)
    experiment = {"variants": [{"name": "control", "adapter": "a", "weight": 70},
                               {"name": "candidate", "adapter": "b", "weight": 30}]}
    assert httpx.put(f"{two}/admin/tenants/{tenant}/experiments/ab", json=experiment,
                     headers=admin()).status_code == 200
    users = [f"user-{i}" for i in range(60)]

    def variant(gateway: str, user: str) -> str:
        response = complete(gateway, key, "ab", user=user)
        assert response.status_code == 200, response.text
        expected = {"control": "a@1", "candidate": "b@1"}[response.headers["x-loragate-variant"]]
        assert response.headers["x-loragate-adapter"] == expected
        return response.headers["x-loragate-variant"]

    with ThreadPoolExecutor(8) as pool:
        on_one = list(pool.map(lambda u: variant(one, u), users))
        on_two = list(pool.map(lambda u: variant(two, u), users))
    assert on_one == on_two
    assert {"control", "candidate"} == set(on_one)
    deadline = time.monotonic() + 30  # generous: a loaded CI machine books late
    while True:  # figures are recorded after each answer, in the background
        got = httpx.get(f"{one}/admin/tenants/{tenant}/experiments/ab", headers=admin()).json()
        total = sum(v["figures"]["requests"] for v in got["variants"])
        if total == 2 * len(users) or time.monotonic() > deadline:
            break
    assert total == 2 * len(users)
    control = next(v for v in got["variants"] if v["name"] == "control")["figures"]
    assert control["requests"] == 2 * on_one.count("control")
    assert control["p50_latency_ms"] is not None and control["tokens_out"] == control["requests"]


def test_runtime_killed_mid_traffic(cluster: Cluster, peft_adapter: Path) -> None:
    gateway = cluster.gateways[0]
    tenant, key = new_tenant(gateway)
    upload(gateway, tenant, "support", peft_adapter)
    with httpx.stream("POST", f"{gateway}/v1/completions", headers=bearer(key), timeout=30,
                      json={"model": "support", "prompt": "x", "max_tokens": 200,
                            "stream": True}) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["choices"][0]["text"]
        serving = [i for i, url in enumerate(cluster.runtimes)
                   if httpx.get(f"{url}/stats").json()["num_streams"] > 0]
        assert len(serving) == 1
        cluster.runtime_procs[serving[0]].send_signal(signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))
    assert error["error"]["code"] == "runtime_failed"
    # Requests for the same adapter were placed on the dead runtime: retried on the other.
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: complete(gateway, key, "support"), range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    assert httpx.get(f"{gateway}/healthz").status_code == 200
