"""A/B experiments in the catalog: upsert, read, delete, and resolution to adapter refs."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters import queries as q
from adapters.errors import Conflict, InvalidArgument, NotFound
from adapters.models import Adapter, AdapterVersion, Experiment, ExperimentVariant, utcnow
from adapters.storage import ArtifactStore
from adapters.views import (
    AdapterRefData,
    ExperimentView,
    ResolvedAdapter,
    ShadowSpec,
    ShadowView,
    VariantSpec,
    VariantView,
)

MAX_VARIANTS = 16


def _check_specs(name: str, variants: list[VariantSpec], shadow: ShadowSpec | None) -> None:
    q.check_name("experiment", name)
    if not variants or len(variants) > MAX_VARIANTS:
        raise InvalidArgument(f"an experiment needs 1 to {MAX_VARIANTS} variants")
    seen: set[str] = set()
    total = 0.0
    for spec in variants:
        q.check_name("variant", spec.name)
        if spec.name in seen:
            raise InvalidArgument(f"variant name {spec.name!r} is repeated")
        seen.add(spec.name)
        total += q.check_fraction(f"weight of {spec.name!r}", spec.weight, None)
        _check_version(spec.version)
    if total <= 0:
        raise InvalidArgument("variant weights must have a positive sum")
    if shadow is not None:
        q.check_fraction("shadow sample_rate", shadow.sample_rate, 1.0)
        _check_version(shadow.version)


def _check_version(version: int | None) -> None:
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise InvalidArgument("version must be a positive integer or null")


async def _pin(
    session: AsyncSession, tenant_id: int, adapter: str, version: int | None
) -> tuple[int, int | None]:
    row = await q.adapter_row(session, tenant_id, adapter)
    if version is None:
        return row.id, None
    return row.id, (await q.version_row(session, row, version)).id


async def put_experiment(
    sessions: async_sessionmaker[AsyncSession],
    tenant: str,
    name: str,
    variants: list[VariantSpec],
    shadow: ShadowSpec | None,
) -> ExperimentView:
    """Create or replace; the row (and so the A/B hash seed id) survives a replace."""
    _check_specs(name, variants, shadow)
    for attempt in range(2):
        try:
            async with sessions() as session, session.begin():
                owner = await q.tenant_row(session, tenant)
                if await q.adapter_named(session, owner.id, name):
                    raise Conflict(f"an adapter named {name!r} exists")
                pins = [await _pin(session, owner.id, v.adapter, v.version) for v in variants]
                shadow_pin = (
                    await _pin(session, owner.id, shadow.adapter, shadow.version)
                    if shadow is not None
                    else (None, None)
                )
                row = await session.scalar(
                    select(Experiment).where(
                        Experiment.tenant_id == owner.id, Experiment.name == name
                    )
                )
                if row is None:
                    row = Experiment(tenant_id=owner.id, name=name)
                    session.add(row)
                else:
                    await session.execute(
                        delete(ExperimentVariant).where(ExperimentVariant.experiment_id == row.id)
                    )
                row.shadow_adapter_id, row.shadow_version_id = shadow_pin
                row.shadow_sample_rate = float(shadow.sample_rate) if shadow else None
                row.updated_at = utcnow()
                await session.flush()
                for position, (spec, (adapter_id, version_id)) in enumerate(
                    zip(variants, pins, strict=True)
                ):
                    session.add(
                        ExperimentVariant(
                            experiment_id=row.id,
                            position=position,
                            name=spec.name,
                            adapter_id=adapter_id,
                            version_id=version_id,
                            weight=float(spec.weight),
                        )
                    )
                await session.flush()
                return await experiment_view(session, owner.id, name)
        except IntegrityError:  # two first PUTs of the same name raced: the loser replaces
            if attempt == 1:
                raise Conflict(f"experiment {name!r} changed concurrently; retry") from None
    raise AssertionError("unreachable")


async def delete_experiment(
    sessions: async_sessionmaker[AsyncSession], tenant: str, name: str
) -> None:
    async with sessions() as session, session.begin():
        owner = await q.tenant_row(session, tenant)
        row = await session.scalar(
            select(Experiment).where(Experiment.tenant_id == owner.id, Experiment.name == name)
        )
        if row is None:
            raise NotFound(f"experiment {name!r} not found")
        await session.delete(row)


async def _names(session: AsyncSession, adapter_ids: set[int], version_ids: set[int]):
    adapters = dict(
        (
            await session.execute(
                select(Adapter.id, Adapter.name).where(Adapter.id.in_(adapter_ids))
            )
        ).all()
    )
    numbers = dict(
        (
            await session.execute(
                select(AdapterVersion.id, AdapterVersion.number).where(
                    AdapterVersion.id.in_(version_ids)
                )
            )
        ).all()
    )
    return adapters, numbers


async def _views(session: AsyncSession, rows: list[Experiment]) -> list[ExperimentView]:
    variants = list(
        await session.scalars(
            select(ExperimentVariant)
            .where(ExperimentVariant.experiment_id.in_([r.id for r in rows]))
            .order_by(ExperimentVariant.position)
        )
    )
    adapter_ids = {v.adapter_id for v in variants} | {
        r.shadow_adapter_id for r in rows if r.shadow_adapter_id is not None
    }
    version_ids = {v.version_id for v in variants if v.version_id is not None} | {
        r.shadow_version_id for r in rows if r.shadow_version_id is not None
    }
    adapters, numbers = await _names(session, adapter_ids, version_ids)
    views = []
    for row in rows:
        mine = tuple(
            VariantView(
                v.name,
                adapters[v.adapter_id],
                numbers[v.version_id] if v.version_id is not None else None,
                v.weight,
            )
            for v in variants
            if v.experiment_id == row.id
        )
        shadow = None
        if row.shadow_adapter_id is not None and row.shadow_sample_rate is not None:
            pinned = row.shadow_version_id
            shadow = ShadowView(
                adapters[row.shadow_adapter_id],
                numbers[pinned] if pinned is not None else None,
                row.shadow_sample_rate,
            )
        views.append(ExperimentView(row.id, row.name, mine, shadow, row.updated_at))
    return views


async def experiment_view(session: AsyncSession, tenant_id: int, name: str) -> ExperimentView:
    row = await session.scalar(
        select(Experiment).where(Experiment.tenant_id == tenant_id, Experiment.name == name)
    )
    if row is None:
        raise NotFound(f"experiment {name!r} not found")
    return (await _views(session, [row]))[0]


async def experiment_views(session: AsyncSession, tenant_id: int) -> list[ExperimentView]:
    rows = list(
        await session.scalars(
            select(Experiment).where(Experiment.tenant_id == tenant_id).order_by(Experiment.name)
        )
    )
    return await _views(session, rows)


class Resolver:
    """Turns adapter names (and pinned or null versions) into runtime refs, in one session."""

    def __init__(self, session: AsyncSession, store: ArtifactStore) -> None:
        self.session = session
        self.store = store

    async def adapter(self, tenant_id: int, name: str, version: int | None) -> ResolvedAdapter:
        row = await q.adapter_row(self.session, tenant_id, name)
        chosen = (
            await q.version_row(self.session, row, version)
            if version is not None
            else await q.active_version(self.session, row)
        )
        if chosen is None:
            raise NotFound(f"adapter {name!r} has no active version")
        ref = AdapterRefData(
            sha256=chosen.sha256,
            uri=self.store.uri(chosen.sha256),
            rank=chosen.rank,
            alpha=chosen.alpha,
            target_modules=tuple(chosen.target_modules),
            use_rslora=chosen.use_rslora,
        )
        return ResolvedAdapter(name=row.name, version=chosen.number, ref=ref)

    async def experiment(self, tenant_id: int, view: ExperimentView) -> ExperimentView:
        variants = tuple([
            VariantView(
                v.name, v.adapter, v.version, v.weight,
                await self.adapter(tenant_id, v.adapter, v.version),
            )
            for v in view.variants
        ])  # fmt: skip
        shadow = view.shadow
        if shadow is not None:
            shadow = ShadowView(
                shadow.adapter,
                shadow.version,
                shadow.sample_rate,
                await self.adapter(tenant_id, shadow.adapter, shadow.version),
            )
        return ExperimentView(view.id, view.name, variants, shadow, view.updated_at)
