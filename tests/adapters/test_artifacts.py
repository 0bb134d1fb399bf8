"""The object collector against an upload of the same bytes, in the one interleaving that
would leave a committed version pointing at a deleted object without the lock row."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from adapters import artifacts
from adapters import queries as q
from adapters.catalog import Catalog
from tests.support.adapter_files import stored_names, upload

pytestmark = pytest.mark.integration
DEADLINE_S = 30.0


async def _someone_waits_on_a_lock(cat: Catalog) -> bool:
    async with cat._sessions() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


async def test_a_collection_waits_for_an_upload_holding_the_object(
    postgres_catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cat = postgres_catalog
    await cat.create_tenant("acme")
    await cat.create_tenant("beta")
    await upload(cat, tmp_path, "acme", "a", 5)
    theirs = await upload(cat, tmp_path, "acme", "a", 1)  # version 2, not active

    upload_holds, release_upload, checked = asyncio.Event(), asyncio.Event(), asyncio.Event()
    upload_done = threading.Event()
    real_hold, real_referenced, real_delete = artifacts.hold, q.object_referenced, cat.store.delete

    async def hold(session, shas):
        await real_hold(session, shas)
        if not upload_holds.is_set():  # the first caller is beta's upload, in its transaction
            upload_holds.set()
            await release_upload.wait()

    async def referenced(session, sha):
        found = await real_referenced(session, sha)
        checked.set()
        return found

    def delete(sha):
        # A collector that checked too early deletes only after the upload finished (and
        # so after its last look at the store): the interleaving the lock row must forbid.
        upload_done.wait(DEADLINE_S)
        real_delete(sha)

    monkeypatch.setattr(artifacts, "hold", hold)
    monkeypatch.setattr(q, "object_referenced", referenced)
    monkeypatch.setattr(cat.store, "delete", delete)

    uploading = asyncio.create_task(upload(cat, tmp_path, "beta", "b", 1))  # acme's bytes
    uploading.add_done_callback(lambda _: upload_done.set())
    await asyncio.wait_for(upload_holds.wait(), DEADLINE_S)
    collecting = asyncio.create_task(cat.delete_version("acme", "a", 2))
    # Let the upload commit only once the collector is blocked on the lock row (or, were
    # the lock missing, has already decided that nobody references the object).
    deadline = time.monotonic() + DEADLINE_S
    while not checked.is_set() and not await _someone_waits_on_a_lock(cat):
        assert time.monotonic() < deadline, "the collector neither waited nor checked"
        await asyncio.sleep(0.01)
    release_upload.set()
    mine = await asyncio.wait_for(uploading, DEADLINE_S)
    await asyncio.wait_for(collecting, DEADLINE_S)

    assert mine.sha256 == theirs.sha256
    assert mine.sha256 in stored_names(cat.store)  # beta's committed version has its bytes
    assert [v.version for v in (await cat.get_adapter("acme", "a")).versions] == [1]
