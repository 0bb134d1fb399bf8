"""The Alembic history upgrades and downgrades on SQLite and PostgreSQL, and its head is
exactly the schema adapters/models.py declares."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from adapters.db import (
    create_engine,
    current_revision,
    downgrade,
    head_revision,
    run_migrations,
    upgrade_database,
)
from adapters.models import Base

TABLES = {
    "tenants",
    "api_keys",
    "adapters",
    "adapter_versions",
    "experiments",
    "experiment_variants",
    "rollouts",
    "rollout_events",
    "artifact_locks",
}


async def _tables_and_diff(url: str) -> tuple[set[str], list]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:

            def inspect_sync(sync_conn):
                names = set(inspect(sync_conn).get_table_names())
                ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})
                return names, compare_metadata(ctx, Base.metadata)

            return await conn.run_sync(inspect_sync)
    finally:
        await engine.dispose()


def _check_round_trip(url: str) -> None:
    assert current_revision(url) is None
    upgrade_database(url)
    assert current_revision(url) == head_revision()
    tables, diff = asyncio.run(_tables_and_diff(url))
    assert TABLES <= tables
    assert diff == []  # the migration builds exactly the models' schema
    run_migrations(url, "downgrade", "base")
    assert current_revision(url) is None
    tables, _ = asyncio.run(_tables_and_diff(url))
    assert not (TABLES & tables)
    upgrade_database(url)  # and up again from base
    assert current_revision(url) == head_revision()


@pytest.mark.unit
def test_sqlite_upgrades_and_downgrades(tmp_path: Path) -> None:
    _check_round_trip(f"sqlite+aiosqlite:///{tmp_path / 'sub' / 'c.db'}")


def _reset_postgres(url: str) -> None:
    async def drop_all() -> None:
        engine = create_engine(url)
        async with engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
        await engine.dispose()

    asyncio.run(drop_all())  # other tests of the session may have migrated it already


@pytest.mark.integration
def test_concurrent_upgrades_on_postgres_both_succeed(postgres_url: str) -> None:
    # Two replicas starting at once: the advisory lock in migrations/env.py serializes them.
    _reset_postgres(postgres_url)
    code = "import sys; from adapters.db import upgrade_database; upgrade_database(sys.argv[1])"
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, postgres_url], cwd=root, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert current_revision(postgres_url) == head_revision()


@pytest.mark.integration
def test_postgres_upgrades_and_downgrades(postgres_url: str) -> None:
    _reset_postgres(postgres_url)
    try:
        _check_round_trip(postgres_url)
    finally:
        upgrade_database(postgres_url)


@pytest.mark.unit
async def test_upgrade_works_from_inside_a_running_loop(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    upgrade_database(url)  # embedded serve calls it from its async startup
    assert current_revision(url) == head_revision()
    downgrade(url, "base")
    assert current_revision(url) is None


async def _insert(url: str, *statements: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


SEED = (
    "INSERT INTO tenants (id, name, created_at) VALUES (1, 't', CURRENT_TIMESTAMP)",
    "INSERT INTO adapters (id, tenant_id, name, next_version, created_at, updated_at)"
    " VALUES (1, 1, 'a', 3, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP),"
    " (2, 1, 'b', 2, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
)


def _version(id_: int, adapter: int, number: int, active: bool) -> str:
    sha = f"{id_:064x}"
    flag = "TRUE" if active else "FALSE"
    return (
        "INSERT INTO adapter_versions (id, adapter_id, number, sha256, config_sha256, rank,"
        " alpha, target_modules, use_rslora, size_bytes, is_active, created_at) VALUES"
        f" ({id_}, {adapter}, {number}, '{sha}', '{sha}', 4, 8.0, '[\"q_proj\"]', FALSE, 10,"
        f" {flag}, CURRENT_TIMESTAMP)"
    )


def _rollout(
    id_: int,
    adapter: int,
    *,
    state: str = "running",
    version: int = 2,
    stage: int = 0,
    max_error_rate: float = 0.02,
) -> str:
    return (
        "INSERT INTO rollouts (id, adapter_id, version, from_version, stages, stage_seconds,"
        " min_requests, max_error_rate, max_latency_p95_ratio, min_score_delta, state, stage,"
        " stage_started_at, created_at, updated_at) VALUES"
        f" ({id_}, {adapter}, {version}, 1, '[5, 100]', 60.0, 10, {max_error_rate}, 1.5,"
        f" -0.05, '{state}', {stage}, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
    )


BAD_STATES = {
    "two_active_versions": [_version(1, 1, 1, True), _version(2, 1, 2, True)],
    "repeated_version_number": [_version(1, 1, 1, True), _version(2, 1, 1, False)],
    "duplicate_adapter_name": [
        "INSERT INTO adapters (tenant_id, name, next_version, created_at, updated_at)"
        " VALUES (1, 'a', 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
    ],
    "negative_weight": [
        _version(1, 1, 1, True),
        "INSERT INTO experiments (id, tenant_id, name, created_at, updated_at)"
        " VALUES (1, 1, 'e', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
        "INSERT INTO experiment_variants (experiment_id, position, name, adapter_id, weight)"
        " VALUES (1, 0, 'v', 1, -1)",
    ],
    "variant_pins_a_version_of_another_adapter": [
        _version(1, 1, 1, True),
        _version(2, 2, 1, True),
        "INSERT INTO experiments (id, tenant_id, name, created_at, updated_at)"
        " VALUES (1, 1, 'e', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
        "INSERT INTO experiment_variants (experiment_id, position, name, adapter_id,"
        " version_id, weight) VALUES (1, 0, 'v', 1, 2, 1)",
    ],
    "shadow_rate_above_one": [
        "INSERT INTO experiments (tenant_id, name, shadow_adapter_id, shadow_sample_rate,"
        " created_at, updated_at) VALUES (1, 'e', 1, 1.5, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
    ],
    "rank_zero": [_version(1, 1, 1, True).replace(" 4, 8.0,", " 0, 8.0,")],
    "two_running_rollouts_of_one_adapter": [_rollout(1, 1), _rollout(2, 1)],
    "rollout_in_an_unknown_state": [_rollout(1, 1, state="paused")],
    "rollout_candidate_is_its_stable_version": [_rollout(1, 1, version=1)],
    "rollout_error_rate_above_one": [_rollout(1, 1, max_error_rate=1.5)],
    "rollout_stage_negative": [_rollout(1, 1, stage=-1)],
    "rollout_of_an_unknown_adapter": [_rollout(1, 9)],
    "rollout_event_with_an_unknown_action": [
        _rollout(1, 1),
        "INSERT INTO rollout_events (rollout_id, at, action, stage, reason)"
        " VALUES (1, CURRENT_TIMESTAMP, 'paused', 0, 'x')",
    ],
    "artifact_lock_not_a_sha256": [
        "INSERT INTO artifact_locks (sha256, touched_at) VALUES ('abc', CURRENT_TIMESTAMP)"
    ],
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
async def test_schema_refuses_bad_states(case: str, any_db_url: str) -> None:
    await _insert(any_db_url, *SEED)
    with pytest.raises(IntegrityError):
        await _insert(any_db_url, *BAD_STATES[case])


async def test_schema_accepts_the_good_state_the_bad_ones_differ_from(any_db_url: str) -> None:
    await _insert(any_db_url, *SEED, _version(1, 1, 1, True), _version(2, 1, 2, False))
    await _insert(
        any_db_url,
        "INSERT INTO experiments (id, tenant_id, name, shadow_adapter_id, shadow_version_id,"
        " shadow_sample_rate, created_at, updated_at)"
        " VALUES (1, 1, 'e', 1, 2, 1.0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
        "INSERT INTO experiment_variants (experiment_id, position, name, adapter_id,"
        " version_id, weight) VALUES (1, 0, 'v', 1, 2, 0)",
    )

    # One running and any number of finished rollouts per adapter; each adapter its own.
    await _insert(
        any_db_url,
        _rollout(1, 1, state="rolled_back"),
        _rollout(2, 1, state="promoted", stage=1),
        _rollout(3, 1),
        _rollout(4, 2),
        "INSERT INTO rollout_events (rollout_id, at, action, stage, reason)"
        " VALUES (3, CURRENT_TIMESTAMP, 'advanced', 0, 'held')",
        f"INSERT INTO artifact_locks (sha256, touched_at) VALUES ('{'a' * 64}', CURRENT_TIMESTAMP)",
    )


def _migrated_to_0001(kind: str, tmp_path: Path, postgres_url: str | None) -> str:
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    else:
        assert postgres_url is not None
        _reset_postgres(postgres_url)
        url = postgres_url
    run_migrations(url, "upgrade", "0001")
    return url


async def _scalar(url: str, statement: str):
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text(statement))).scalar_one()
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("sqlite", marks=pytest.mark.unit),
        pytest.param("postgres", marks=pytest.mark.integration),
    ],
)
def test_0002_keeps_existing_rows_up_and_down(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    postgres_url = request.getfixturevalue("postgres_url") if kind == "postgres" else None
    url = _migrated_to_0001(kind, tmp_path, postgres_url)
    try:
        asyncio.run(
            _insert(
                url,
                *SEED,
                "INSERT INTO api_keys (id, tenant_id, name, prefix, secret_hash, created_at)"
                f" VALUES ('key_1', 1, 'ci', '0123456789ab', '{'f' * 64}', CURRENT_TIMESTAMP)",
            )
        )
        run_migrations(url, "upgrade", "0002")
        assert current_revision(url) == "0002"
        # Existing keys never expire; the key survived with its other columns.
        assert (
            asyncio.run(_scalar(url, "SELECT count(*) FROM api_keys WHERE expires_at IS NULL")) == 1
        )
        run_migrations(url, "downgrade", "0001")
        assert current_revision(url) == "0001"
        tables, _ = asyncio.run(_tables_and_diff(url))
        assert not ({"rollouts", "rollout_events", "artifact_locks"} & tables)
        assert asyncio.run(_scalar(url, "SELECT prefix FROM api_keys")) == "0123456789ab"
        # The rebuilt api_keys table still refuses a second key with the same prefix.
        with pytest.raises(IntegrityError):
            asyncio.run(
                _insert(
                    url,
                    "INSERT INTO api_keys (id, tenant_id, name, prefix, secret_hash, created_at)"
                    f" VALUES ('key_2', 1, 'ci', '0123456789ab', '{'f' * 64}', CURRENT_TIMESTAMP)",
                )
            )
    finally:
        if postgres_url is not None:
            upgrade_database(postgres_url)
