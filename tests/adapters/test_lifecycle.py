"""The operator surface in the catalog: key expiry and listing, tenant limits, deleting
adapters and tenants, and the collection of stored objects no version uses any more."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from adapters import versions
from adapters.catalog import Catalog
from adapters.errors import Conflict, InvalidArgument, NotFound
from adapters.keys import parse_key
from adapters.models import ApiKey, ArtifactLock, Base, Tenant
from adapters.views import RolloutSpec, ShadowSpec, VariantSpec
from tests.support.adapter_files import count_rows, stored_names, upload


async def _set_expiry(cat: Catalog, key_id: str, when: datetime) -> None:
    async with cat._sessions() as session, session.begin():
        await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(expires_at=when))


async def test_keys_expire_like_revoked_ones(any_catalog: Catalog) -> None:
    cat = any_catalog
    await cat.create_tenant("acme")
    now = datetime.now(UTC)
    later = now + timedelta(days=1)
    view, plaintext = await cat.create_key("acme", "ci", expires_at=later)
    prefix = (parse_key(plaintext) or ("", ""))[0]
    record = await cat.lookup_key(prefix)
    assert record is not None and not record.revoked
    assert record.expires_at == later and record.expires_at.tzinfo is not None
    assert not record.expired(now) and record.expired(later)  # checked again on cached records
    # Already past at lookup: refused like a revoked key, by today's gateway as it is.
    await _set_expiry(cat, view.id, now - timedelta(seconds=1))
    expired = await cat.lookup_key(prefix)
    assert expired is not None and expired.revoked and expired.expired(now)
    _, forever = await cat.create_key("acme", "forever")
    lasting = await cat.lookup_key((parse_key(forever) or ("", ""))[0])
    assert lasting is not None and lasting.expires_at is None and not lasting.expired(later)
    for bad in (now - timedelta(seconds=1), later.replace(tzinfo=None), "2030-01-01T00:00:00Z"):
        with pytest.raises(InvalidArgument):
            await cat.create_key("acme", "bad", expires_at=bad)  # type: ignore[arg-type]


async def test_an_expiry_in_another_offset_is_the_same_moment(any_catalog: Catalog) -> None:
    await any_catalog.create_tenant("acme")
    moment = datetime(2099, 1, 1, 9, 0, tzinfo=UTC)
    plus9 = moment.astimezone(timezone(timedelta(hours=9)))  # 18:00 in Tokyo
    _, plaintext = await any_catalog.create_key("acme", "ci", expires_at=plus9)
    [item] = await any_catalog.list_keys("acme")
    assert item.to_dict()["expires_at"] == "2099-01-01T09:00:00Z"
    record = await any_catalog.lookup_key((parse_key(plaintext) or ("", ""))[0])
    assert record is not None and record.expires_at == moment


async def test_key_list_shows_state_never_secrets(any_catalog: Catalog) -> None:
    cat = any_catalog
    await cat.create_tenant("acme")
    await cat.create_tenant("beta")
    first, secret_one = await cat.create_key("acme", "ci")
    second, _ = await cat.create_key("acme", "ops", expires_at=datetime(2099, 1, 1, tzinfo=UTC))
    await cat.create_key("beta", "theirs")
    await cat.revoke_key(first.id)
    listed = [k.to_dict() for k in await cat.list_keys("acme")]
    assert [k["id"] for k in listed] == [first.id, second.id]  # only this tenant's
    for item in listed:
        assert set(item) == {"id", "name", "prefix", "created_at", "expires_at", "revoked_at"}
    prefix, secret = parse_key(secret_one) or ("", "")
    assert listed[0]["prefix"] == prefix and secret not in str(listed)
    record = await cat.lookup_key(prefix)
    assert record is not None and record.secret_hash not in str(listed)
    assert listed[0]["revoked_at"].endswith("Z") and listed[0]["expires_at"] is None
    assert listed[1]["revoked_at"] is None and listed[1]["expires_at"] == "2099-01-01T00:00:00Z"
    with pytest.raises(NotFound):
        await cat.list_keys("nobody")


async def test_patch_sets_given_limits_and_null_clears(any_catalog: Catalog) -> None:
    cat = any_catalog
    await cat.create_tenant("acme", requests_per_minute=600, tokens_per_minute=9000)
    _, plaintext = await cat.create_key("acme", "ci")
    changed = await cat.update_tenant("acme", {"requests_per_minute": 1200})
    assert (changed.requests_per_minute, changed.tokens_per_minute) == (1200, 9000)
    cleared = await cat.update_tenant("acme", {"tokens_per_minute": None})
    assert (cleared.requests_per_minute, cleared.tokens_per_minute) == (1200, None)
    assert (await cat.update_tenant("acme", {})).requests_per_minute == 1200
    record = await cat.lookup_key((parse_key(plaintext) or ("", ""))[0])
    assert record is not None and (record.requests_per_minute, record.tokens_per_minute) == (
        1200,
        None,
    )
    for bad in ({"requests_per_minute": 0}, {"tokens_per_minute": True}, {"name": "x"}):
        with pytest.raises(InvalidArgument):
            await cat.update_tenant("acme", bad)  # type: ignore[arg-type]
    assert (await cat.get_tenant("acme")).requests_per_minute == 1200
    with pytest.raises(NotFound):
        await cat.update_tenant("nobody", {"requests_per_minute": 5})


async def test_deleting_an_adapter_waits_for_its_experiments_and_rollout(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    cat = any_catalog
    await cat.create_tenant("acme")
    await upload(cat, tmp_path, "acme", "a", 1)
    await upload(cat, tmp_path, "acme", "a", 2)
    await upload(cat, tmp_path, "acme", "b", 3)
    await cat.put_experiment("acme", "exp", [VariantSpec("c", "a", None, 1)], None)
    with pytest.raises(Conflict):
        await cat.delete_adapter("acme", "a")  # a variant follows its active version
    await cat.put_experiment(
        "acme", "exp", [VariantSpec("c", "b", None, 1)], ShadowSpec("a", None, 0.5)
    )
    with pytest.raises(Conflict):
        await cat.delete_adapter("acme", "a")  # the shadow uses it
    await cat.delete_experiment("acme", "exp")
    await cat.start_rollout("acme", "a", RolloutSpec(version=2))
    with pytest.raises(Conflict):
        await cat.delete_adapter("acme", "a")
    await cat.abort_rollout("acme", "a")
    await cat.delete_adapter("acme", "a")  # a finished rollout goes with it
    assert [a.name for a in await cat.list_adapters("acme")] == ["b"]
    assert await count_rows(cat) == (1, 1)
    for call in (cat.get_adapter("acme", "a"), cat.get_rollout("acme", "a"),
                 cat.resolve("acme", "a"), cat.delete_adapter("acme", "a")):  # fmt: skip
        with pytest.raises(NotFound):
            await call
    again = await upload(cat, tmp_path, "acme", "a", 4)
    assert again.version == 1 and again.active  # the name starts over


async def test_objects_go_once_no_version_of_any_tenant_uses_them(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    cat = any_catalog
    store = cat.store
    await cat.create_tenant("acme")
    await cat.create_tenant("beta")
    shared_a = await upload(cat, tmp_path, "acme", "a", 1)
    own_a = await upload(cat, tmp_path, "acme", "a", 2)
    shared_b = await upload(cat, tmp_path, "beta", "b", 1)  # same bytes as acme's a@1
    assert shared_a.sha256 == shared_b.sha256
    assert len(stored_names(store)) == 3  # two safetensors and one config object (same config)
    await cat.delete_adapter("acme", "a")
    names = stored_names(store)
    assert shared_a.sha256 in names and own_a.sha256 not in names
    assert len(names) == 2  # beta's model and the config, shared by everyone
    await cat.delete_tenant("beta")
    assert stored_names(store) == set()
    async with cat._sessions() as session:  # the collector dropped the lock rows with them
        assert await session.scalar(select(func.count()).select_from(ArtifactLock)) == 0


async def test_deleting_a_tenant_leaves_no_row_and_no_working_key(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    cat = any_catalog
    await cat.create_tenant("acme")
    await cat.create_tenant("beta")
    _, plaintext = await cat.create_key("acme", "ci")
    _, kept_key = await cat.create_key("beta", "ci")
    await upload(cat, tmp_path, "acme", "a", 1)
    await upload(cat, tmp_path, "acme", "a", 2)
    await upload(cat, tmp_path, "acme", "b", 3)
    await upload(cat, tmp_path, "beta", "a", 3)
    await cat.put_experiment("acme", "exp", [VariantSpec("c", "a", 2, 1)], ShadowSpec("b", 1, 1))
    await cat.start_rollout("acme", "a", RolloutSpec(version=2, stages=(50, 100)))  # no 409
    await cat.delete_tenant("acme")
    assert await cat.lookup_key((parse_key(plaintext) or ("", ""))[0]) is None
    assert await cat.lookup_key((parse_key(kept_key) or ("", ""))[0]) is not None
    counts = {}
    async with cat._sessions() as session:
        for table in Base.metadata.sorted_tables:
            counts[table.name] = await session.scalar(select(func.count()).select_from(table))
        assert await session.scalar(select(Tenant.name)) == "beta"
    # One lock row each for beta's model and the config that every version shares.
    assert counts == {"tenants": 1, "api_keys": 1, "adapters": 1, "adapter_versions": 1,
                      "experiments": 0, "experiment_variants": 0, "rollouts": 0,
                      "rollout_events": 0, "artifact_locks": 2}  # fmt: skip
    assert len(stored_names(cat.store)) == 2  # beta's a@1 (seed 3, as acme's b) and config
    with pytest.raises(NotFound):
        await cat.delete_tenant("acme")
    await cat.create_tenant("acme")  # the name is free again, with nothing in it
    assert await cat.list_adapters("acme") == [] and await cat.list_keys("acme") == []


async def test_another_tenants_objects_are_not_found(any_catalog: Catalog, tmp_path: Path) -> None:
    cat = any_catalog
    await cat.create_tenant("acme")
    await cat.create_tenant("beta")
    await upload(cat, tmp_path, "acme", "secret", 1)
    await upload(cat, tmp_path, "acme", "secret", 2)
    for call in (
        cat.delete_adapter("beta", "secret"),
        cat.start_rollout("beta", "secret", RolloutSpec(version=2)),
        cat.get_rollout("beta", "secret"),
        cat.abort_rollout("beta", "secret"),
    ):
        with pytest.raises(NotFound):
            await call
    assert [a.name for a in await cat.list_adapters("acme")] == ["secret"]


async def test_an_object_collected_before_an_upload_commits_is_put_back(
    any_catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The upload finds its bytes stored (acme's), then acme's delete collects them before
    # the upload's row exists; the upload's check after its commit puts them back.
    cat = any_catalog
    await cat.create_tenant("acme")
    await cat.create_tenant("beta")
    theirs = await upload(cat, tmp_path, "acme", "a", 1)
    real_insert = versions.insert_version
    collected: list[list[str]] = []

    async def delete_first(*args, **kwargs):
        await cat.delete_adapter("acme", "a")
        collected.append(sorted(stored_names(cat.store)))
        return await real_insert(*args, **kwargs)

    monkeypatch.setattr("adapters.versions.insert_version", delete_first)
    mine = await upload(cat, tmp_path, "beta", "b", 1)
    assert collected == [[]]  # the object really was gone in between
    assert mine.sha256 == theirs.sha256 and mine.sha256 in stored_names(cat.store)
    resolved = await cat.resolve("beta", "b")
    assert resolved.adapter is not None and resolved.adapter.ref.sha256 == mine.sha256


async def test_an_upload_racing_a_delete_of_its_adapter_ends_consistent(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    cat = any_catalog
    await cat.create_tenant("acme")
    for round_ in range(4):
        await upload(cat, tmp_path, "acme", "a", 10 * round_)
        results = await asyncio.gather(
            upload(cat, tmp_path, "acme", "a", 10 * round_ + 1),
            cat.delete_adapter("acme", "a"),
            return_exceptions=True,
        )
        assert not any(isinstance(r, BaseException) for r in results), results
        # Whichever went first, every version left has its objects in the store.
        for adapter in await cat.list_adapters("acme"):
            assert adapter.active_version is not None
            for version in adapter.versions:
                assert version.sha256 in stored_names(cat.store)
        if await cat.list_adapters("acme"):
            await cat.delete_adapter("acme", "a")
        assert stored_names(cat.store) == set()
