"""Rollouts in the catalog: start, read, abort, and the decision step of each stage.

One decision per stage across every gateway replica: `decide` applies a verdict with a
conditional UPDATE ... WHERE id = ? AND stage = ? AND state = 'running'. The replica that
loses the race matches no row and gets None; nothing is held between decisions, so no lease
can expire under a replica that stalls, and the same statement is exact on SQLite and on
PostgreSQL (where the loser waits for the winner's locks, then its UPDATE reads the row the
winner committed). A Redis lease would add a second store and a TTL to get wrong; a held
row lock would pin a connection for a whole stage.
Every writer takes the adapter's lock first (`queries.lock_adapter`), then the rollout's
row, so a decision, a start, an abort, an activation and a version delete never deadlock.
Promotion makes the candidate active in the decision's own transaction.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters import queries as q
from adapters.errors import Conflict, InvalidArgument, NotFound
from adapters.experiments import Resolver
from adapters.guardrails import Verdict
from adapters.models import Adapter, Rollout, RolloutEvent, Tenant, utcnow
from adapters.views import (
    Guardrails,
    ResolvedAdapter,
    ResolvedRollout,
    RolloutEventView,
    RolloutSpec,
    RolloutView,
    as_utc,
)

MAX_STAGES = 20
MAX_STAGE_SECONDS = 30 * 24 * 3600.0
MAX_MIN_REQUESTS = 10**9
MAX_REASON_CHARS = 500  # the rollout_events.reason column


def _number(what: str, value: object, low: float, high: float, *, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"{what} must be a finite number")
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise InvalidArgument(f"{what} must be in {bracket}{low:g}, {high:g}]")
    return value


def check_spec(spec: RolloutSpec) -> RolloutSpec:
    """The spec with its stages as a tuple; InvalidArgument (400) for anything out of range."""
    if isinstance(spec.version, bool) or not isinstance(spec.version, int) or spec.version < 1:
        raise InvalidArgument("version must be a positive integer")
    stages = tuple(spec.stages) if isinstance(spec.stages, list | tuple) else ()
    if not 0 < len(stages) <= MAX_STAGES:
        raise InvalidArgument(f"stages must be a list of 1 to {MAX_STAGES} percentages")
    for i, weight in enumerate(stages):
        _number(f"stage {i}", weight, 0, 100, low_open=True)
        # Strictly ascending: a sticky user never leaves the candidate as the weight grows.
        if i and weight <= stages[i - 1]:
            raise InvalidArgument("stages must be strictly ascending")
    _number("stage_seconds", spec.stage_seconds, 0, MAX_STAGE_SECONDS, low_open=True)
    if (
        isinstance(spec.min_requests, bool)
        or not isinstance(spec.min_requests, int)
        or not 0 <= spec.min_requests <= MAX_MIN_REQUESTS
    ):
        raise InvalidArgument(f"min_requests must be an integer in [0, {MAX_MIN_REQUESTS}]")
    g = spec.guardrails
    _number("max_error_rate", g.max_error_rate, 0, 1, low_open=False)
    _number("max_latency_p95_ratio", g.max_latency_p95_ratio, 0, math.inf, low_open=True)
    _number("min_score_delta", g.min_score_delta, -1, 1, low_open=False)
    return RolloutSpec(spec.version, stages, spec.stage_seconds, spec.min_requests, g)


def _event(rollout_id: int, action: str, stage: int, reason: str) -> RolloutEvent:
    return RolloutEvent(
        rollout_id=rollout_id, action=action, stage=stage, reason=reason[:MAX_REASON_CHARS]
    )


def _at(stages: list[float], stage: int) -> str:
    return f"stage {stage} ({stages[stage]:g}%)"


async def running_row(session: AsyncSession, adapter_id: int) -> Rollout | None:
    return await session.scalar(
        select(Rollout).where(Rollout.adapter_id == adapter_id, Rollout.state == "running")
    )


async def start(
    sessions: async_sessionmaker[AsyncSession], tenant: str, adapter: str, spec: RolloutSpec
) -> RolloutView:
    """A new running rollout of `spec.version` against the active version, at stage 0."""
    spec = check_spec(spec)
    try:
        async with sessions() as session, session.begin():
            owner = await q.tenant_row(session, tenant)
            row = await q.adapter_row(session, owner.id, adapter)
            await q.lock_adapter(session, row.id)
            if await running_row(session, row.id) is not None:
                raise Conflict(f"a rollout of {adapter!r} is running")
            candidate = await q.version_row(session, row, spec.version)
            active = await q.active_version(session, row)
            if active is None or active.id == candidate.id:
                raise Conflict(f"version {spec.version} of {adapter!r} is the active version")
            g = spec.guardrails
            rollout = Rollout(
                adapter_id=row.id,
                version=candidate.number,
                from_version=active.number,
                stages=list(spec.stages),
                stage_seconds=float(spec.stage_seconds),
                min_requests=spec.min_requests,
                max_error_rate=float(g.max_error_rate),
                max_latency_p95_ratio=float(g.max_latency_p95_ratio),
                min_score_delta=float(g.min_score_delta),
                state="running",
                stage=0,
            )
            session.add(rollout)
            await session.flush()
            reason = (
                f"version {candidate.number} against version {active.number},"
                f" {_at(rollout.stages, 0)}"
            )
            session.add(_event(rollout.id, "started", 0, reason))
    except IntegrityError:  # the one-running index: a start that did not take our lock
        raise Conflict(f"a rollout of {adapter!r} is running") from None
    return await by_id(sessions, rollout.id)


async def _views(session: AsyncSession, where: list) -> list[RolloutView]:
    found = (
        await session.execute(
            select(Rollout, Adapter.name, Tenant.name)
            .join(Adapter, Adapter.id == Rollout.adapter_id)
            .join(Tenant, Tenant.id == Adapter.tenant_id)
            .where(*where)
            .order_by(Rollout.id)
        )
    ).all()
    events = list(
        await session.scalars(
            select(RolloutEvent)
            .where(RolloutEvent.rollout_id.in_([r.id for r, _, _ in found]))
            .order_by(RolloutEvent.id)
        )
    )
    views = []
    for row, adapter, tenant in found:
        history = tuple(
            RolloutEventView(as_utc(e.at), e.action, e.stage, e.reason)  # type: ignore[arg-type]
            for e in events
            if e.rollout_id == row.id
        )
        views.append(
            RolloutView(
                id=row.id,
                tenant=tenant,
                adapter=adapter,
                version=row.version,
                from_version=row.from_version,
                state=row.state,  # type: ignore[arg-type]
                stage=row.stage,
                stages=tuple(row.stages),
                stage_seconds=row.stage_seconds,
                min_requests=row.min_requests,
                guardrails=Guardrails(
                    row.max_error_rate, row.max_latency_p95_ratio, row.min_score_delta
                ),
                stage_started_at=as_utc(row.stage_started_at),
                created_at=as_utc(row.created_at),
                updated_at=as_utc(row.updated_at),
                history=history,
            )
        )
    return views


async def by_id(sessions: async_sessionmaker[AsyncSession], rollout_id: int) -> RolloutView:
    async with sessions() as session:
        found = await _views(session, [Rollout.id == rollout_id])
    if not found:
        raise NotFound(f"rollout {rollout_id} not found")
    return found[0]


async def latest(
    sessions: async_sessionmaker[AsyncSession], tenant: str, adapter: str
) -> RolloutView:
    """The running rollout of the adapter, else its most recent one; NotFound if none."""
    async with sessions() as session:
        owner = await q.tenant_row(session, tenant)
        row = await q.adapter_row(session, owner.id, adapter)
        newest = await session.scalar(
            select(Rollout.id)
            .where(Rollout.adapter_id == row.id)
            .order_by(Rollout.id.desc())
            .limit(1)
        )
        if newest is None:
            raise NotFound(f"adapter {adapter!r} has no rollout")
        return (await _views(session, [Rollout.id == newest]))[0]


async def running(sessions: async_sessionmaker[AsyncSession]) -> list[RolloutView]:
    """Every running rollout of every tenant: what each gateway's decision loop watches."""
    async with sessions() as session:
        return await _views(session, [Rollout.state == "running"])


async def abort(
    sessions: async_sessionmaker[AsyncSession], tenant: str, adapter: str
) -> RolloutView:
    """Stop the running rollout; all traffic goes back to the active version."""
    async with sessions() as session, session.begin():
        owner = await q.tenant_row(session, tenant)
        row = await q.adapter_row(session, owner.id, adapter)
        await q.lock_adapter(session, row.id)
        current = await running_row(session, row.id)
        if current is None:
            raise NotFound(f"no rollout of {adapter!r} is running")
        await session.execute(
            update(Rollout)
            .where(Rollout.id == current.id, Rollout.state == "running")
            .values(state="aborted", updated_at=utcnow())
        )
        reason = f"aborted by an operator at {_at(current.stages, current.stage)}"
        session.add(_event(current.id, "aborted", current.stage, reason))
        rollout_id = current.id
    return await by_id(sessions, rollout_id)


class _Lost(Exception):
    """Another replica decided this stage first (or the rollout stopped): roll back."""


async def decide(
    sessions: async_sessionmaker[AsyncSession],
    rollout_id: int,
    expected_stage: int,
    verdict: Verdict,
) -> RolloutView | None:
    """Apply one verdict to stage `expected_stage`: advance, promote after the last stage,
    or roll back on a breach. Exactly once across replicas: the rollout as it is now when
    this call made the decision, None when another call already had (or it is not running).
    """
    try:
        async with sessions() as session, session.begin():
            row = await session.get(Rollout, rollout_id)
            if row is None or row.state != "running" or row.stage != expected_stage:
                raise _Lost
            adapter_id, stages, version = row.adapter_id, list(row.stages), row.version
            await q.lock_adapter(session, adapter_id)
            where = update(Rollout).where(
                Rollout.id == rollout_id,
                Rollout.stage == expected_stage,
                Rollout.state == "running",
            )
            now = utcnow()
            label = _at(stages, expected_stage)
            values: dict[str, Any]
            if not verdict.passed:
                action, values = "rolled_back", {"state": "rolled_back"}
            elif expected_stage == len(stages) - 1:
                action, values = "promoted", {"state": "promoted"}
            else:
                action = "advanced"
                values = {"stage": expected_stage + 1, "stage_started_at": now}
            result = await session.execute(where.values(updated_at=now, **values))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise _Lost
            if action == "promoted":
                adapter = await session.get_one(Adapter, adapter_id)
                candidate = await q.version_row(session, adapter, version)
                await q.set_active(session, adapter_id, candidate.id)
            reason = f"{label}: {verdict.reason}"
            if action == "advanced":
                reason += f"; now {_at(stages, expected_stage + 1)}"
            session.add(_event(rollout_id, action, expected_stage, reason))
    except _Lost:
        return None
    return await by_id(sessions, rollout_id)


async def uses_version(session: AsyncSession, adapter_id: int, number: int) -> bool:
    """Whether a running rollout of the adapter has this version as its candidate."""
    current = await running_row(session, adapter_id)
    return current is not None and current.version == number


async def resolve_running(
    session: AsyncSession, resolver: Resolver, tenant_id: int, stable: ResolvedAdapter
) -> ResolvedRollout | None:
    """The running rollout of the adapter `stable` resolved from, with both arms; or None."""
    current = await session.scalar(
        select(Rollout)
        .join(Adapter, Adapter.id == Rollout.adapter_id)
        .where(
            Adapter.tenant_id == tenant_id,
            Adapter.name == stable.name,
            Rollout.state == "running",
        )
    )
    if current is None:
        return None
    candidate = await resolver.adapter(tenant_id, stable.name, current.version)
    return ResolvedRollout(
        id=current.id,
        stage=current.stage,
        weight=current.stages[current.stage],
        stable=stable,
        candidate=candidate,
    )
