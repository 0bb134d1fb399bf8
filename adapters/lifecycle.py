"""Changing and removing whole tenants and adapters, with their stored objects.

Each delete removes rows in one transaction, commits, then hands the sha256s its versions
named to `artifacts.collect`, which removes the objects no version of any tenant still
references. Before reading which objects its versions name, a delete locks what an upload
must lock to add a version (the adapter rows; for a tenant also the tenant row, which a new
adapter, experiment or key references), so an upload racing the delete either commits first
(its version is deleted with the rest, its objects collected) or starts after it (and makes
a new adapter, or finds the tenant gone).
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters import artifacts, rollouts
from adapters import queries as q
from adapters.errors import Conflict, InvalidArgument, NotFound
from adapters.models import (
    Adapter,
    AdapterVersion,
    ApiKey,
    Experiment,
    ExperimentVariant,
    Tenant,
    utcnow,
)
from adapters.storage import ArtifactStore

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute")
_RETRIES = 3  # a tenant delete that lost a race with a new experiment: read again


async def update_tenant(
    sessions: async_sessionmaker[AsyncSession], name: str, limits: Mapping[str, int | None]
) -> Tenant:
    """Set the given limits (None: no limit); limits not given keep their value.

    The values are already checked by the caller (Catalog.update_tenant)."""
    unknown = sorted(set(limits) - set(LIMIT_FIELDS))
    if unknown:
        raise InvalidArgument(f"unknown tenant field {unknown[0]!r}")
    async with sessions() as session, session.begin():
        row = await q.tenant_row(session, name)
        if limits:
            await session.execute(update(Tenant).where(Tenant.id == row.id).values(**limits))
            await session.refresh(row)
        return row


async def _version_shas(session: AsyncSession, adapter_ids: list[int]) -> list[str]:
    found = await session.execute(
        select(AdapterVersion.sha256, AdapterVersion.config_sha256).where(
            AdapterVersion.adapter_id.in_(adapter_ids)
        )
    )
    return [sha for pair in found for sha in pair]


async def adapter_in_experiment(session: AsyncSession, adapter_id: int) -> bool:
    """Whether any experiment has a variant or its shadow on this adapter, any version."""
    in_variant = exists().where(ExperimentVariant.adapter_id == adapter_id)
    in_shadow = exists().where(Experiment.shadow_adapter_id == adapter_id)
    return bool(await session.scalar(select(or_(in_variant, in_shadow))))


async def delete_adapter(
    sessions: async_sessionmaker[AsyncSession], store: ArtifactStore, tenant: str, adapter: str
) -> None:
    """Every version, and the adapter's finished rollouts; Conflict while an experiment or
    a running rollout uses it."""
    in_use = Conflict(f"adapter {adapter!r} is used by an experiment")
    try:
        async with sessions() as session, session.begin():
            owner = await q.tenant_row(session, tenant)
            row = await q.adapter_row(session, owner.id, adapter)
            await q.lock_adapter(session, row.id)
            if await adapter_in_experiment(session, row.id):
                raise in_use
            if await rollouts.running_row(session, row.id) is not None:
                raise Conflict(f"a rollout of {adapter!r} is running")
            shas = await _version_shas(session, [row.id])
            # Versions, rollouts and their events go by ON DELETE CASCADE.
            await session.execute(delete(Adapter).where(Adapter.id == row.id))
    except IntegrityError:  # an experiment took it up between our check and the delete
        raise in_use from None
    await artifacts.collect(sessions, store, shas)


async def delete_tenant(
    sessions: async_sessionmaker[AsyncSession], store: ArtifactStore, name: str
) -> None:
    """Keys, adapters, versions, experiments and rollouts: every row of the tenant."""
    for attempt in range(_RETRIES):
        try:
            shas = await _delete_tenant_rows(sessions, name)
            break
        except IntegrityError:
            # A put_experiment committed variants on these adapters after our experiment
            # delete ran (PostgreSQL only: SQLite has one writer); read everything again.
            if attempt == _RETRIES - 1:
                raise Conflict(f"tenant {name!r} changed concurrently; retry") from None
    await artifacts.collect(sessions, store, shas)


async def _delete_tenant_rows(sessions: async_sessionmaker[AsyncSession], name: str) -> list[str]:
    async with sessions() as session, session.begin():
        owner = await session.scalar(select(Tenant).where(Tenant.name == name).with_for_update())
        if owner is None:
            raise NotFound(f"tenant {name!r} not found")
        # The first write: SQLite's write lock; on PostgreSQL the rows an upload's counter
        # bump must lock (the tenant's FOR UPDATE already stops new adapters and keys).
        await session.execute(
            update(Adapter).where(Adapter.tenant_id == owner.id).values(updated_at=utcnow())
        )
        adapter_ids = list(
            await session.scalars(select(Adapter.id).where(Adapter.tenant_id == owner.id))
        )
        shas = await _version_shas(session, adapter_ids)
        # Experiments first: their variants RESTRICT the adapters they name.
        await session.execute(delete(Experiment).where(Experiment.tenant_id == owner.id))
        await session.execute(delete(Adapter).where(Adapter.tenant_id == owner.id))
        await session.execute(delete(ApiKey).where(ApiKey.tenant_id == owner.id))
        await session.execute(delete(Tenant).where(Tenant.id == owner.id))
    return shas
