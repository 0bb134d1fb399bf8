"""Two gateways over one PostgreSQL catalog and one Redis: the arms' figures and the feedback
are shared, and each stage is decided exactly once however the replicas race."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from adapters.db import upgrade_database
from adapters.views import RolloutView
from gateway.app import create_app
from tests.support.delivery import (
    LATER,
    QUIET_LOOP,
    ask,
    get_rollout,
    in_app,
    score,
    services_of,
    start_rollout,
    two_versions,
    users,
)
from tests.support.gw_helpers import make_settings

pytestmark = pytest.mark.integration


def rollbacks(metrics_text: str, tenant: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("loragate_rollout_rollbacks_total{") and f'tenant="{tenant}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def both_tick(a: AsyncTestClient[Any], b: AsyncTestClient[Any]) -> list[RolloutView]:
    """Both replicas' decision rounds at once, at the same instant; every decision applied."""
    now = datetime.now(UTC) + LATER
    results = await asyncio.gather(in_app(a, services_of(a).rollouts.tick, now),
                                   in_app(b, services_of(b).rollouts.tick, now))
    return [view for decided in results for view in decided]


async def test_two_gateways_make_one_decision_per_stage(
    tmp_path: Path, base_model_dir: Path, stub_url: str, postgres_url: str, redis_url: str,
    peft_adapter: Path, peft_adapter_v2: Path,
) -> None:
    common = {"runtimes": (stub_url,), "database_url": postgres_url, "redis_url": redis_url,
              **QUIET_LOOP}
    settings_a = make_settings(tmp_path / "a", base_model_dir, **common)
    settings_b = make_settings(tmp_path / "b", base_model_dir, **common)
    upgrade_database(postgres_url)
    tenant = f"ro-{secrets.token_hex(4)}"  # the session's database is shared with other tests
    async with (
        AsyncTestClient(create_app(settings_a)) as a,
        AsyncTestClient(create_app(settings_b)) as b,
    ):
        key = await two_versions(a, tenant, peft_adapter, peft_adapter_v2)
        await start_rollout(a, tenant, stages=[50, 100], min_requests=6)

        # Traffic and feedback split over both replicas, each answer scored on the other.
        served = []
        for i, user in enumerate(users(30)):
            here, there = (a, b) if i % 2 else (b, a)
            completion_id, arm, _adapter = await ask(here, key, user)
            assert await score(there, key, completion_id, 0.9 if arm == "candidate" else 0.8) \
                == 204
            served.append(arm)
        for client in (a, b):
            await in_app(client, services_of(client).background.drain)
        # Shared figures: replica B counts the answers replica A served too.
        seen = (await get_rollout(b, tenant))["candidate"]
        assert seen["requests"] == served.count("candidate") and seen["feedback_count"] == \
            served.count("candidate")

        # Racing again after the decision changes nothing: one decision over all rounds.
        decided = [view for _ in range(3) for view in await both_tick(a, b)]
        assert [(d.state, d.stage) for d in decided] == [("running", 1)]
        rollout = await get_rollout(a, tenant)
        assert [e["action"] for e in rollout["history"]] == ["started", "advanced"]

        # Stage 1 (100%): a candidate that users now dislike is rolled back, once.
        for i, user in enumerate(users(8, "late")):
            here, there = (a, b) if i % 2 else (b, a)
            completion_id, arm, _adapter = await ask(here, key, user)
            assert arm == "candidate"
            assert await score(there, key, completion_id, 0.1) == 204
        for client in (a, b):
            await in_app(client, services_of(client).background.drain)
        decided = [view for _ in range(3) for view in await both_tick(a, b)]
        assert [d.state for d in decided] == ["rolled_back"]
        rollout = await get_rollout(b, tenant)
        assert [e["action"] for e in rollout["history"]] == ["started", "advanced", "rolled_back"]
        texts = [(await client.get("/metrics")).text for client in (a, b)]
        assert sum(rollbacks(text, tenant) for text in texts) == 1
