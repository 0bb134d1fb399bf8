"""Writing adapter versions: numbering under concurrency and activation of the first.

Garbage collection of the stored objects lives in adapters/artifacts.py."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters import artifacts
from adapters import queries as q
from adapters.errors import Conflict
from adapters.models import Adapter, AdapterVersion, utcnow
from adapters.validation import ValidatedAdapter
from adapters.views import VersionView

_RETRIES = 3  # two first uploads of a new adapter race on its unique name


class _AdapterVanished(Exception):
    """The adapter row was deleted between our read of it and our counter bump."""


async def insert_version(
    sessions: async_sessionmaker[AsyncSession],
    tenant: str,
    adapter: str,
    checked: ValidatedAdapter,
    activate: bool | None,
) -> VersionView:
    """Number and insert a validated version in one transaction; the first becomes active."""
    for attempt in range(_RETRIES):
        try:
            async with sessions() as session, session.begin():
                owner = await q.tenant_row(session, tenant)
                row = await session.scalar(
                    select(Adapter).where(Adapter.tenant_id == owner.id, Adapter.name == adapter)
                )
                if row is None:
                    if await q.experiment_named(session, owner.id, adapter):
                        raise Conflict(f"an experiment named {adapter!r} exists")
                    row = Adapter(tenant_id=owner.id, name=adapter, next_version=1)
                    session.add(row)
                    await session.flush()
                # The counter bump is the lock that numbers concurrent uploads 1, 2, 3.
                await session.execute(
                    update(Adapter)
                    .where(Adapter.id == row.id)
                    .values(next_version=Adapter.next_version + 1, updated_at=utcnow())
                )
                number = await session.scalar(
                    select(Adapter.next_version).where(Adapter.id == row.id)
                )
                if number is None:  # deleted under us: this upload starts a new adapter
                    raise _AdapterVanished
                # After the adapter's lock, so every writer takes the two in one order.
                await artifacts.hold(session, [checked.sha256, checked.config_sha256])
                current = await q.active_version(session, row)
                version = AdapterVersion(
                    adapter_id=row.id,
                    number=number - 1,
                    sha256=checked.sha256,
                    config_sha256=checked.config_sha256,
                    rank=checked.rank,
                    alpha=checked.alpha,
                    target_modules=list(checked.target_modules),
                    use_rslora=checked.use_rslora,
                    size_bytes=checked.size_bytes,
                    is_active=False,
                )
                session.add(version)
                await session.flush()
                if current is None or activate:
                    await q.set_active(session, row.id, version.id)
                    version.is_active = True
                return q.version_view(adapter, version)
        except (IntegrityError, _AdapterVanished):  # raced a create or a delete of the adapter
            if attempt == _RETRIES - 1:
                raise Conflict(f"adapter {adapter!r} changed concurrently; retry") from None
    raise AssertionError("unreachable")
