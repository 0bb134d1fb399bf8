"""Garbage collection of stored objects, race-safe against uploads of the same bytes.

An object (content addressed by sha256) is shared by every version of any tenant with the
same bytes; its reference count is the number of `adapter_versions` rows naming it, read
from the table itself so it can never drift. An object goes once that count is zero.

The race: an upload puts its objects first (finding one already there is a no-op), then
commits its version row, then checks that its objects still exist and puts back any that
vanished. A collector that checked "no references" before that commit and deleted after the
upload's check would leave a committed version pointing at nothing. So both sides take the
object's lock row (`artifact_locks`, an upsert that writes, so a row lock on PostgreSQL and
the write lock on SQLite) and the collector holds it from its reference check through the
delete. An upload's commit then falls either before the check (the collector sees the
reference and keeps the object) or after the delete (the upload's post-commit check sees
the object gone and puts it back from its own file).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters import queries as q
from adapters.errors import StorageUnavailable
from adapters.models import ArtifactLock, utcnow
from adapters.storage import ArtifactStore


async def hold(session: AsyncSession, shas: Iterable[str]) -> None:
    """Take the lock rows of these objects until the session's transaction ends.

    Sorted, so two transactions holding overlapping sets never wait on each other in a ring.
    """
    rows = [{"sha256": sha, "touched_at": utcnow()} for sha in sorted(set(shas))]
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(ArtifactLock).values(rows)
    # DO UPDATE, not DO NOTHING: only a write locks a row that exists already.
    statement = statement.on_conflict_do_update(
        index_elements=[ArtifactLock.sha256], set_={"touched_at": statement.excluded.touched_at}
    )
    await session.execute(statement)


async def collect(
    sessions: async_sessionmaker[AsyncSession], store: ArtifactStore, shas: Iterable[str]
) -> list[str]:
    """Delete the objects among `shas` that no version of any tenant references.

    Call after the transaction that dropped the references has committed. Returns the shas
    removed. A store failure does not stop the others; the first one is raised at the end
    (the object and its lock row stay, so a later collection can remove it).
    """
    removed: list[str] = []
    failure: StorageUnavailable | None = None
    for sha in sorted(set(shas)):
        try:
            # Shielded: a cancelled caller must not release the lock while the store's
            # delete still runs in its thread.
            if await asyncio.shield(_collect_one(sessions, store, sha)):
                removed.append(sha)
        except StorageUnavailable as exc:
            failure = failure or exc
    if failure is not None:
        raise failure
    return removed


async def _collect_one(
    sessions: async_sessionmaker[AsyncSession], store: ArtifactStore, sha: str
) -> bool:
    async with sessions() as session, session.begin():
        await hold(session, [sha])
        if await q.object_referenced(session, sha):
            return False
        # Still holding the lock: no upload of these bytes can commit meanwhile.
        await asyncio.to_thread(store.delete, sha)
        await session.execute(delete(ArtifactLock).where(ArtifactLock.sha256 == sha))
    return True
