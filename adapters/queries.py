"""Tenant-scoped lookups shared by the catalog services; each raises NotFound, never leaks."""

from __future__ import annotations

import math
import re

from sqlalchemy import exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from adapters.errors import InvalidArgument, NotFound
from adapters.models import Adapter, AdapterVersion, Experiment, ExperimentVariant, Tenant, utcnow
from adapters.views import VersionView

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# The version number column is a 32-bit INTEGER on PostgreSQL (64-bit on SQLite). A number
# past it cannot name a version; sent to the driver it raised OverflowError (a 500 found by
# the API fuzz: DELETE .../versions/29929273960059124056064, or model "name@<huge>").
MAX_VERSION_NUMBER = 2**31 - 1


def check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidArgument(f"{kind} name must match ^[a-z0-9][a-z0-9._-]{{0,62}}$")
    return name


def check_fraction(what: str, value: object, upper: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"{what} must be a finite number")
    if value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper:g}]" if upper is not None else "non-negative"
        raise InvalidArgument(f"{what} must be {bound}")
    return float(value)


async def tenant_row(session: AsyncSession, name: str) -> Tenant:
    row = await session.scalar(select(Tenant).where(Tenant.name == name))
    if row is None:
        raise NotFound(f"tenant {name!r} not found")
    return row


async def adapter_row(session: AsyncSession, tenant_id: int, name: str) -> Adapter:
    row = await session.scalar(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    )
    if row is None:
        raise NotFound(f"adapter {name!r} not found")
    return row


async def version_row(session: AsyncSession, adapter: Adapter, number: int) -> AdapterVersion:
    if not 0 < number <= MAX_VERSION_NUMBER:
        raise NotFound(f"no such version of adapter {adapter.name!r}")
    row = await session.scalar(
        select(AdapterVersion).where(
            AdapterVersion.adapter_id == adapter.id, AdapterVersion.number == number
        )
    )
    if row is None:
        raise NotFound(f"version {number} of adapter {adapter.name!r} not found")
    return row


async def active_version(session: AsyncSession, adapter: Adapter) -> AdapterVersion | None:
    return await session.scalar(
        select(AdapterVersion).where(
            AdapterVersion.adapter_id == adapter.id, AdapterVersion.is_active.is_(True)
        )
    )


async def lock_adapter(session: AsyncSession, adapter_id: int) -> None:
    """Serialize writers of one adapter: a row lock on PostgreSQL, the write lock on SQLite.

    An UPDATE rather than SELECT FOR UPDATE because SQLite ignores FOR UPDATE and only takes
    its write lock at the first write of a transaction.
    """
    await session.execute(
        update(Adapter).where(Adapter.id == adapter_id).values(updated_at=utcnow())
    )


async def set_active(session: AsyncSession, adapter_id: int, version_id: int) -> None:
    # Two statements, in this order, so the one-active partial unique index never sees two.
    await session.execute(
        update(AdapterVersion)
        .where(AdapterVersion.adapter_id == adapter_id, AdapterVersion.is_active.is_(True))
        .values(is_active=False)
    )
    await session.execute(
        update(AdapterVersion).where(AdapterVersion.id == version_id).values(is_active=True)
    )


async def experiment_named(session: AsyncSession, tenant_id: int, name: str) -> bool:
    return bool(
        await session.scalar(
            select(exists().where(Experiment.tenant_id == tenant_id, Experiment.name == name))
        )
    )


async def adapter_named(session: AsyncSession, tenant_id: int, name: str) -> bool:
    return bool(
        await session.scalar(
            select(exists().where(Adapter.tenant_id == tenant_id, Adapter.name == name))
        )
    )


async def version_in_experiment(session: AsyncSession, version_id: int) -> bool:
    in_variant = exists().where(ExperimentVariant.version_id == version_id)
    in_shadow = exists().where(Experiment.shadow_version_id == version_id)
    return bool(await session.scalar(select(or_(in_variant, in_shadow))))


async def object_referenced(session: AsyncSession, sha256: str) -> bool:
    """Whether any version of any tenant still points at this stored object."""
    return bool(
        await session.scalar(
            select(
                exists().where(
                    or_(AdapterVersion.sha256 == sha256, AdapterVersion.config_sha256 == sha256)
                )
            )
        )
    )


def version_view(adapter_name: str, row: AdapterVersion) -> VersionView:
    return VersionView(
        adapter=adapter_name,
        version=row.number,
        sha256=row.sha256,
        rank=row.rank,
        alpha=row.alpha,
        target_modules=tuple(row.target_modules),
        size_bytes=row.size_bytes,
        created_at=row.created_at,
        active=row.is_active,
        use_rslora=row.use_rslora,
    )
