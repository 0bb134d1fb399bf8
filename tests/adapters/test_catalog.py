"""Catalog services on SQLite and PostgreSQL: tenants, keys, versions, experiments, resolve."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from adapters.catalog import Catalog
from adapters.errors import Conflict, InvalidArgument, NotFound
from adapters.keys import parse_key, verify_secret
from adapters.views import ShadowSpec, VariantSpec, VersionView
from tests.support.adapter_files import (
    count_rows,
    lora_tensors,
    stored_objects,
    write_adapter,
)


async def _upload(
    cat: Catalog, where: Path, tenant: str, adapter: str, seed: int, activate: bool | None = None
) -> VersionView:
    paths = write_adapter(where / f"{tenant}-{adapter}-{seed}", model=lora_tensors(seed=seed))
    return await cat.upload_version(tenant, adapter, *paths, activate=activate)


async def test_tenants_are_unique_named_and_listed(any_catalog: Catalog) -> None:
    made = await any_catalog.create_tenant("acme", requests_per_minute=600, tokens_per_minute=9)
    await any_catalog.create_tenant("beta")
    assert made.to_dict() == {
        "name": "acme",
        "requests_per_minute": 600,
        "tokens_per_minute": 9,
        "created_at": made.to_dict()["created_at"],
    }
    assert made.to_dict()["created_at"].endswith("Z")
    with pytest.raises(Conflict):
        await any_catalog.create_tenant("acme")
    with pytest.raises(InvalidArgument):
        await any_catalog.create_tenant("Acme!")
    with pytest.raises(InvalidArgument):
        await any_catalog.create_tenant("ok", requests_per_minute=0)
    with pytest.raises(NotFound):
        await any_catalog.get_tenant("nobody")
    assert [t.name for t in await any_catalog.list_tenants()] == ["acme", "beta"]
    assert (await any_catalog.get_tenant("acme")).requests_per_minute == 600


async def test_keys_store_only_a_hash_and_revoke(any_catalog: Catalog) -> None:
    await any_catalog.create_tenant("acme")
    view, plaintext = await any_catalog.create_key("acme", "ci")
    assert set(view.to_dict()) == {"id", "name", "tenant", "created_at", "revoked"}
    prefix, secret = parse_key(plaintext) or ("", "")
    record = await any_catalog.lookup_key(prefix)
    assert record is not None and record.tenant == "acme" and not record.revoked
    assert secret not in record.secret_hash and verify_secret(secret, record.secret_hash)
    assert not verify_secret(secret + "x", record.secret_hash)
    revoked = await any_catalog.revoke_key(view.id)
    assert revoked.revoked and (await any_catalog.lookup_key(prefix)).revoked  # type: ignore[union-attr]
    assert await any_catalog.lookup_key("0" * 12) is None
    with pytest.raises(NotFound):
        await any_catalog.revoke_key("key_unknown")
    with pytest.raises(NotFound):
        await any_catalog.create_key("nobody", "ci")
    assert [k.id for k in await any_catalog.list_keys("acme")] == [view.id]


async def test_versions_number_activate_and_roll_back(any_catalog: Catalog, tmp_path: Path) -> None:
    await any_catalog.create_tenant("acme")
    v1 = await _upload(any_catalog, tmp_path, "acme", "support", 1)
    v2 = await _upload(any_catalog, tmp_path, "acme", "support", 2)
    v3 = await _upload(any_catalog, tmp_path, "acme", "support", 3, activate=True)
    assert [v.version for v in (v1, v2, v3)] == [1, 2, 3]
    assert (v1.active, v2.active, v3.active) == (True, False, True)
    [adapter] = await any_catalog.list_adapters("acme")
    assert adapter.active_version == 3
    assert [v.active for v in adapter.versions] == [False, False, True]
    rolled = await any_catalog.activate("acme", "support", 1)
    assert rolled.active_version == 1
    assert rolled.to_dict()["versions"][0] == {
        **v1.to_dict(),
        "active": True,
    }
    with pytest.raises(NotFound):
        await any_catalog.activate("acme", "support", 7)
    with pytest.raises(Conflict):
        await any_catalog.delete_version("acme", "support", 1)


async def test_writes_that_can_stale_a_cache_announce_their_tenant(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    heard: list[str] = []

    async def listener(tenant: str) -> None:
        heard.append(tenant)

    any_catalog.on_change(listener)
    await any_catalog.create_tenant("acme")
    await any_catalog.create_tenant("beta")
    key, _ = await any_catalog.create_key("acme", "ci")
    assert heard == []  # nothing about a new tenant or key can be cached yet
    await any_catalog.revoke_key(key.id)
    await _upload(any_catalog, tmp_path, "beta", "support", 1)
    await _upload(any_catalog, tmp_path, "beta", "support", 2)
    await any_catalog.activate("beta", "support", 2)
    await any_catalog.delete_version("beta", "support", 1)
    await any_catalog.put_experiment("beta", "ab", [VariantSpec("a", "support", None, 1.0)])
    await any_catalog.delete_experiment("beta", "ab")
    assert heard == ["acme"] + ["beta"] * 6
    with pytest.raises(Conflict):
        await any_catalog.delete_version("beta", "support", 2)  # the active one
    with pytest.raises(NotFound):
        await any_catalog.activate("beta", "support", 9)
    assert len(heard) == 7  # a refused write announces nothing


async def test_concurrent_uploads_get_distinct_numbers(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    await any_catalog.create_tenant("acme")
    views = await asyncio.gather(
        *(_upload(any_catalog, tmp_path, "acme", "busy", seed) for seed in range(6))
    )
    assert sorted(v.version for v in views) == [1, 2, 3, 4, 5, 6]
    [adapter] = await any_catalog.list_adapters("acme")
    assert sum(v.active for v in adapter.versions) == 1


async def test_delete_removes_objects_only_when_unshared(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    await any_catalog.create_tenant("acme")
    await _upload(any_catalog, tmp_path, "acme", "support", 1)
    same_a = await _upload(any_catalog, tmp_path, "acme", "support", 2)
    same_b = await _upload(any_catalog, tmp_path, "acme", "support", 2)  # same bytes again
    assert same_a.sha256 == same_b.sha256
    await any_catalog.delete_version("acme", "support", 2)
    names = {p.name for p in stored_objects(any_catalog.store)}  # type: ignore[arg-type]
    assert same_a.sha256 in names  # version 3 still needs it
    await any_catalog.delete_version("acme", "support", 3)
    names = {p.name for p in stored_objects(any_catalog.store)}  # type: ignore[arg-type]
    assert same_a.sha256 not in names
    assert len(names) == 2  # version 1: model and config
    assert await count_rows(any_catalog) == (1, 1)
    with pytest.raises(NotFound):
        await any_catalog.delete_version("acme", "support", 3)


async def test_experiments_validate_and_guard_their_versions(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    cat = any_catalog
    await cat.create_tenant("acme")
    await _upload(cat, tmp_path, "acme", "a", 1)
    await _upload(cat, tmp_path, "acme", "a", 2)
    await _upload(cat, tmp_path, "acme", "b", 3)
    await _upload(cat, tmp_path, "acme", "b", 4)
    variants = [VariantSpec("control", "a", None, 90), VariantSpec("candidate", "a", 2, 10)]
    made = await cat.put_experiment("acme", "exp", variants, ShadowSpec("b", 2, 0.1))
    assert made.to_dict() == {
        "name": "exp",
        "variants": [
            {"name": "control", "adapter": "a", "version": None, "weight": 90},
            {"name": "candidate", "adapter": "a", "version": 2, "weight": 10},
        ],
        "shadow": {"adapter": "b", "version": 2, "sample_rate": 0.1},
    }
    with pytest.raises(Conflict):
        await cat.delete_version("acme", "a", 2)  # a variant pins it
    with pytest.raises(Conflict):
        await cat.delete_version("acme", "b", 2)  # the shadow pins it
    replaced = await cat.put_experiment("acme", "exp", variants[:1], None)
    assert replaced.id == made.id and replaced.shadow is None and len(replaced.variants) == 1
    await cat.delete_version("acme", "b", 2)
    bad_specs = [
        [VariantSpec("x", "a", None, -1)],
        [VariantSpec("x", "a", None, 0), VariantSpec("y", "a", None, 0)],
        [VariantSpec("x", "a", None, 1), VariantSpec("x", "a", None, 1)],
        [],
    ]
    for specs in bad_specs:
        with pytest.raises(InvalidArgument):
            await cat.put_experiment("acme", "exp2", specs, None)
    with pytest.raises(InvalidArgument):
        await cat.put_experiment("acme", "exp2", variants, ShadowSpec("b", None, 1.5))
    with pytest.raises(NotFound):
        await cat.put_experiment("acme", "exp2", [VariantSpec("x", "zzz", None, 1)], None)
    with pytest.raises(NotFound):
        await cat.put_experiment("acme", "exp2", [VariantSpec("x", "a", 9, 1)], None)
    with pytest.raises(Conflict):
        await cat.put_experiment("acme", "a", variants, None)  # an adapter has that name
    with pytest.raises(Conflict):
        await _upload(cat, tmp_path, "acme", "exp", 5)  # an experiment has that name
    assert [e.name for e in await cat.list_experiments("acme")] == ["exp"]
    await cat.delete_experiment("acme", "exp")
    with pytest.raises(NotFound):
        await cat.get_experiment("acme", "exp")
    await cat.delete_version("acme", "a", 2)


async def test_resolve_follows_api_order_and_the_active_version(
    any_catalog: Catalog, tmp_path: Path
) -> None:
    cat = any_catalog
    await cat.create_tenant("acme")
    v1 = await _upload(cat, tmp_path, "acme", "a", 1)
    v2 = await _upload(cat, tmp_path, "acme", "a", 2)
    await cat.put_experiment(
        "acme", "exp", [VariantSpec("c", "a", None, 1)], ShadowSpec("a", 2, 0.5)
    )
    by_name = await cat.resolve("acme", "a")
    assert by_name.kind == "adapter" and by_name.adapter is not None
    assert (by_name.adapter.version, by_name.adapter.ref.sha256) == (1, v1.sha256)
    ref_path = Path(unquote(urlsplit(by_name.adapter.ref.uri).path))
    assert hashlib.sha256(ref_path.read_bytes()).hexdigest() == v1.sha256  # noqa: ASYNC240
    pinned = await cat.resolve("acme", "a@2")
    assert pinned.adapter is not None and pinned.adapter.ref.sha256 == v2.sha256
    experiment = await cat.resolve("acme", "exp")
    assert experiment.kind == "experiment" and experiment.experiment is not None
    [variant] = experiment.experiment.variants
    assert variant.resolved is not None and variant.resolved.version == 1
    assert experiment.experiment.shadow.resolved.version == 2  # type: ignore[union-attr]
    await cat.activate("acme", "a", 2)
    again = await cat.resolve("acme", "exp")
    assert again.experiment.variants[0].resolved.version == 2  # type: ignore[union-attr]
    for missing in ("a@3", "a@0", "a@x", "nothing", "a@"):
        with pytest.raises(NotFound):
            await cat.resolve("acme", missing)


async def test_tenants_never_see_each_other(any_catalog: Catalog, tmp_path: Path) -> None:
    cat = any_catalog
    await cat.create_tenant("acme")
    await cat.create_tenant("beta")
    await _upload(cat, tmp_path, "acme", "secret", 1)
    await cat.put_experiment("acme", "exp", [VariantSpec("c", "secret", None, 1)], None)
    assert await cat.list_adapters("beta") == []
    assert await cat.list_experiments("beta") == []
    for call in (
        cat.resolve("beta", "secret"),
        cat.resolve("beta", "secret@1"),
        cat.resolve("beta", "exp"),
        cat.activate("beta", "secret", 1),
        cat.delete_version("beta", "secret", 1),
        cat.get_experiment("beta", "exp"),
        cat.delete_experiment("beta", "exp"),
        cat.put_experiment("beta", "mine", [VariantSpec("c", "secret", None, 1)], None),
    ):
        with pytest.raises(NotFound):
            await call
    # The same adapter name in another tenant is a different adapter, numbered from 1.
    mine = await _upload(cat, tmp_path, "beta", "secret", 7)
    assert mine.version == 1
