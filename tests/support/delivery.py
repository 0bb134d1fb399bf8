"""Helpers of the rollout and feedback tests: a gateway over a stub runtime, traffic by user,
feedback by arm, and one decision round at a chosen time (no sleeps: the test drives it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from litestar.testing import AsyncTestClient

from adapters.views import RolloutView
from gateway.services import Services
from tests.support.gw_helpers import admin, bearer, create_tenant, upload

# The decision loop's own rounds never fire during a test: the test calls tick itself.
QUIET_LOOP = {"rollout_tick_s": 3600.0}
LATER = timedelta(hours=1)  # past any stage_seconds the tests use
T = TypeVar("T")


def services_of(client: AsyncTestClient[Any]) -> Services:
    services: Services = client.app.state.services
    return services


async def in_app(client: AsyncTestClient[Any], fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run `fn(*args)` on the app's own event loop (the test client serves it from a thread):
    its database and Redis connections belong to that loop."""
    return await asyncio.to_thread(client.blocking_portal.call, fn, *args)


async def two_versions(client: AsyncTestClient[Any], tenant: str, v1: Path, v2: Path) -> str:
    """A tenant with adapter `support`: version 1 active, version 2 not; its key."""
    key = await create_tenant(client, tenant)
    assert (await upload(client, tenant, "support", v1)).status_code == 201
    second = await upload(client, tenant, "support", v2)
    assert second.status_code == 201 and second.json()["active"] is False, second.text
    return key


async def start_rollout(client: AsyncTestClient[Any], tenant: str, **body: Any) -> Any:
    body.setdefault("version", 2)
    # The stub answers in about a millisecond, so the p95 ratio of two arms is noise: the
    # tests judge by feedback and errors unless they ask for the latency guardrail.
    body.setdefault("guardrails", {"max_latency_p95_ratio": 1e6})
    response = await client.put(f"/admin/tenants/{tenant}/adapters/support/rollout", json=body,
                                headers=admin())
    assert response.status_code == 200, response.text
    return response.json()


async def get_rollout(client: AsyncTestClient[Any], tenant: str) -> Any:
    response = await client.get(f"/admin/tenants/{tenant}/adapters/support/rollout",
                                headers=admin())
    assert response.status_code == 200, response.text
    return response.json()


async def ask(client: AsyncTestClient[Any], key: str, user: str,
              model: str = "support") -> tuple[str, str | None, str]:
    """One completion as `user`: (completion id, X-Loragate-Variant, X-Loragate-Adapter)."""
    response = await client.post(
        "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1, "user": user},
        headers=bearer(key))
    assert response.status_code == 200, response.text
    return (response.json()["id"], response.headers.get("x-loragate-variant"),
            response.headers["x-loragate-adapter"])


async def traffic(client: AsyncTestClient[Any], key: str, users: list[str]) -> dict[str, Any]:
    """One request per user: {user: (id, arm, adapter)}, book-keeping done."""
    served = {user: await ask(client, key, user) for user in users}
    await in_app(client, services_of(client).background.drain)
    return served


async def score(client: AsyncTestClient[Any], key: str, completion_id: str,
                value: float) -> int:
    response = await client.post("/v1/feedback", json={"id": completion_id, "score": value},
                                 headers=bearer(key))
    return response.status_code


async def score_arms(client: AsyncTestClient[Any], key: str, served: dict[str, Any],
                     by_arm: dict[str, float]) -> None:
    for completion_id, arm, _adapter in served.values():
        assert await score(client, key, completion_id, by_arm[arm]) == 204


async def tick(client: AsyncTestClient[Any]) -> list[RolloutView]:
    """One decision round as if every stage had lasted an hour."""
    return await in_app(client, services_of(client).rollouts.tick, datetime.now(UTC) + LATER)


def users(n: int, prefix: str = "user") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]
