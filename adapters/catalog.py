"""Catalog services for the gateway: tenants, keys, adapter versions, experiments, rollouts,
resolution.

Every query is scoped by tenant name except the two key operations that are global by
nature (revoke by key id, look up by key prefix). Store calls are blocking and run in worker
threads. Upload order: validate -> put objects -> insert rows in one transaction; objects
this upload created are removed again when the insert fails.

Changes are announced here, not by the callers: listeners registered once with `on_change`
hear the tenant's name after every write that can make a cached answer about that tenant
stale (a key revoked; a version added, activated or deleted; an adapter deleted; an
experiment put or deleted; a tenant's limits patched or the tenant deleted; a rollout
started, aborted, or moved by the one decision that applied).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters import artifacts, lifecycle, rollouts, versions
from adapters import experiments as exp
from adapters import queries as q
from adapters.base_model import BaseModelSpec
from adapters.errors import Conflict, InvalidArgument, NotFound, TooLarge
from adapters.guardrails import Verdict
from adapters.keys import generate_key
from adapters.models import Adapter, AdapterVersion, ApiKey, Tenant, utcnow
from adapters.storage import ArtifactStore
from adapters.validation import validate_adapter
from adapters.views import (
    AdapterView,
    ExperimentView,
    KeyListItem,
    KeyRecord,
    KeyView,
    Resolution,
    RolloutSpec,
    RolloutView,
    ShadowSpec,
    TenantView,
    VariantSpec,
    VersionView,
    as_utc,
)

_RETRIES = 3  # a 48-bit key prefix clash: draw again
ChangeListener = Callable[[str], Awaitable[None]]  # called with the tenant's name


def _tenant_view(row: Tenant) -> TenantView:
    return TenantView(row.name, row.requests_per_minute, row.tokens_per_minute, row.created_at)


def _key_view(row: ApiKey, tenant: str) -> KeyView:
    return KeyView(row.id, row.name, tenant, row.created_at, row.revoked_at is not None)


def _key_item(row: ApiKey) -> KeyListItem:
    return KeyListItem(
        row.id,
        row.name,
        row.prefix,
        as_utc(row.created_at),
        as_utc(row.expires_at) if row.expires_at else None,
        as_utc(row.revoked_at) if row.revoked_at else None,
    )


def _limit(what: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**62:
        raise InvalidArgument(f"{what} must be a positive integer")
    return value


class Catalog:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        store: ArtifactStore,
        base_model: BaseModelSpec,
        max_rank: int = 64,
        max_adapter_bytes: int | None = None,
    ) -> None:
        self._sessions = sessionmaker
        self.store = store
        self.base_model = base_model
        self.max_rank = max_rank
        self.max_adapter_bytes = max_adapter_bytes
        self._listeners: list[ChangeListener] = []

    def on_change(self, listener: ChangeListener) -> None:
        """Call `listener(tenant)` after each announced write (see the module docstring).
        Listeners run in registration order; one that raises fails the call that wrote."""
        self._listeners.append(listener)

    async def _changed(self, tenant: str) -> None:
        for listener in self._listeners:
            await listener(tenant)

    # ------------------------------------------------------------------ tenants
    async def create_tenant(
        self,
        name: str,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> TenantView:
        row = Tenant(
            name=q.check_name("tenant", name),
            requests_per_minute=_limit("requests_per_minute", requests_per_minute),
            tokens_per_minute=_limit("tokens_per_minute", tokens_per_minute),
        )
        try:
            async with self._sessions() as session, session.begin():
                session.add(row)
        except IntegrityError:
            raise Conflict(f"tenant {name!r} already exists") from None
        return _tenant_view(row)

    async def list_tenants(self) -> list[TenantView]:
        async with self._sessions() as session:
            rows = await session.scalars(select(Tenant).order_by(Tenant.name))
            return [_tenant_view(r) for r in rows]

    async def get_tenant(self, name: str) -> TenantView:
        async with self._sessions() as session:
            return _tenant_view(await q.tenant_row(session, name))

    async def update_tenant(self, name: str, limits: Mapping[str, int | None]) -> TenantView:
        """PATCH: set each limit given (None: no limit); the others keep their value."""
        checked = {k: _limit(k, v) if k in lifecycle.LIMIT_FIELDS else v for k, v in limits.items()}
        view = _tenant_view(await lifecycle.update_tenant(self._sessions, name, checked))
        await self._changed(name)
        return view

    async def delete_tenant(self, name: str) -> None:
        """Every row of the tenant (its keys stop working), then its unshared objects."""
        await lifecycle.delete_tenant(self._sessions, self.store, name)
        await self._changed(name)

    # --------------------------------------------------------------------- keys
    async def create_key(
        self, tenant: str, key_name: str, expires_at: datetime | None = None
    ) -> tuple[KeyView, str]:
        """A new key; the plaintext is returned this once and never stored.

        `expires_at` (aware, in the future; None: never) is when it starts failing like a
        revoked key."""
        if (
            not isinstance(key_name, str)
            or not 0 < len(key_name) <= 63
            or not key_name.isprintable()
        ):
            raise InvalidArgument("key name must be 1 to 63 printable characters")
        if expires_at is not None:
            if not isinstance(expires_at, datetime) or expires_at.utcoffset() is None:
                raise InvalidArgument("expires_at must be a date-time with a UTC offset")
            if expires_at <= utcnow():
                raise InvalidArgument("expires_at must be in the future")
            expires_at = as_utc(expires_at)
        for attempt in range(_RETRIES):
            generated = generate_key()
            try:
                async with self._sessions() as session, session.begin():
                    owner = await q.tenant_row(session, tenant)
                    row = ApiKey(
                        id=f"key_{secrets.token_hex(8)}",
                        tenant_id=owner.id,
                        name=key_name,
                        prefix=generated.prefix,
                        secret_hash=generated.secret_hash,
                        expires_at=expires_at,
                    )
                    session.add(row)
                return _key_view(row, tenant), generated.plaintext
            except IntegrityError:  # a 48-bit prefix or 64-bit id clash: draw again
                if attempt == _RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    async def list_keys(self, tenant: str) -> list[KeyListItem]:
        """The tenant's keys, revoked and expired ones included; never a secret or hash."""
        async with self._sessions() as session:
            owner = await q.tenant_row(session, tenant)
            rows = await session.scalars(
                select(ApiKey)
                .where(ApiKey.tenant_id == owner.id)
                .order_by(ApiKey.created_at, ApiKey.id)
            )
            return [_key_item(r) for r in rows]

    async def revoke_key(self, key_id: str) -> KeyView:
        async with self._sessions() as session, session.begin():
            found = (
                await session.execute(
                    select(ApiKey, Tenant.name)
                    .join(Tenant, Tenant.id == ApiKey.tenant_id)
                    .where(ApiKey.id == key_id)
                )
            ).one_or_none()
            if found is None:
                raise NotFound(f"key {key_id!r} not found")
            row, tenant = found
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            view = _key_view(row, tenant)
        await self._changed(tenant)
        return view

    async def lookup_key(self, prefix: str) -> KeyRecord | None:
        async with self._sessions() as session:
            found = (
                await session.execute(
                    select(ApiKey, Tenant)
                    .join(Tenant, Tenant.id == ApiKey.tenant_id)
                    .where(ApiKey.prefix == prefix)
                )
            ).one_or_none()
        if found is None:
            return None
        key, owner = found
        expires_at = as_utc(key.expires_at) if key.expires_at else None
        return KeyRecord(
            key_id=key.id,
            prefix=key.prefix,
            secret_hash=key.secret_hash,
            tenant=owner.name,
            # API.md: an expired key is refused like a revoked one. A caller that caches the
            # record checks `expired(now)` too, for keys that expire while cached.
            revoked=key.revoked_at is not None
            or (expires_at is not None and expires_at <= utcnow()),
            requests_per_minute=owner.requests_per_minute,
            tokens_per_minute=owner.tokens_per_minute,
            expires_at=expires_at,
        )

    # ------------------------------------------------------- adapters, versions
    async def upload_version(
        self,
        tenant: str,
        adapter: str,
        config_path: str | Path,
        model_path: str | Path,
        activate: bool | None = None,
    ) -> VersionView:
        """Validate, store and register a new version; on any failure nothing remains."""
        q.check_name("adapter", adapter)
        config_path, model_path = Path(config_path), Path(model_path)
        async with self._sessions() as session:
            owner = await q.tenant_row(session, tenant)
            if await q.experiment_named(session, owner.id, adapter):
                raise Conflict(f"an experiment named {adapter!r} exists")
        if self.max_adapter_bytes is not None:
            size = model_path.stat().st_size + config_path.stat().st_size
            if size > self.max_adapter_bytes:
                raise TooLarge(f"adapter is over the {self.max_adapter_bytes} byte limit")
        checked = await asyncio.to_thread(
            validate_adapter, config_path, model_path, self.base_model, self.max_rank
        )
        objects = ((model_path, checked.sha256), (config_path, checked.config_sha256))
        created: list[str] = []
        try:
            for path, sha in objects:
                if await asyncio.to_thread(self.store.put_file, path, sha):
                    created.append(sha)
            view = await versions.insert_version(self._sessions, tenant, adapter, checked, activate)
        except BaseException:
            await asyncio.shield(artifacts.collect(self._sessions, self.store, created))
            raise
        # A concurrent delete of another version with the same bytes may have removed an
        # object we found already present; put it back now that our row protects it (the
        # collector's lock makes this check enough: see adapters/artifacts.py).
        for path, sha in objects:
            if not await asyncio.to_thread(self.store.exists, sha):
                await asyncio.to_thread(self.store.put_file, path, sha)
        await self._changed(tenant)
        return view

    async def list_adapters(self, tenant: str) -> list[AdapterView]:
        async with self._sessions() as session:
            owner = await q.tenant_row(session, tenant)
            adapters = list(
                await session.scalars(
                    select(Adapter).where(Adapter.tenant_id == owner.id).order_by(Adapter.name)
                )
            )
            version_rows = await session.scalars(
                select(AdapterVersion)
                .where(AdapterVersion.adapter_id.in_([a.id for a in adapters]))
                .order_by(AdapterVersion.number)
            )
            by_adapter: dict[int, list[AdapterVersion]] = {}
            for v in version_rows:
                by_adapter.setdefault(v.adapter_id, []).append(v)
        return [self._adapter_view(a, by_adapter.get(a.id, [])) for a in adapters]

    @staticmethod
    def _adapter_view(adapter: Adapter, rows: list[AdapterVersion]) -> AdapterView:
        active = next((v.number for v in rows if v.is_active), None)
        views = tuple(q.version_view(adapter.name, v) for v in rows)
        return AdapterView(adapter.name, active, views)

    async def get_adapter(self, tenant: str, adapter: str) -> AdapterView:
        async with self._sessions() as session:
            owner = await q.tenant_row(session, tenant)
            row = await q.adapter_row(session, owner.id, adapter)
            version_rows = list(
                await session.scalars(
                    select(AdapterVersion)
                    .where(AdapterVersion.adapter_id == row.id)
                    .order_by(AdapterVersion.number)
                )
            )
            return self._adapter_view(row, version_rows)

    async def activate(self, tenant: str, adapter: str, version: int) -> AdapterView:
        """Promote or roll back: make `version` the one active version."""
        async with self._sessions() as session, session.begin():
            owner = await q.tenant_row(session, tenant)
            row = await q.adapter_row(session, owner.id, adapter)
            await q.lock_adapter(session, row.id)
            target = await q.version_row(session, row, version)
            await q.set_active(session, row.id, target.id)
        view = await self.get_adapter(tenant, adapter)
        await self._changed(tenant)
        return view

    async def delete_adapter(self, tenant: str, adapter: str) -> None:
        """Every version; Conflict while an experiment or a running rollout uses it."""
        await lifecycle.delete_adapter(self._sessions, self.store, tenant, adapter)
        await self._changed(tenant)

    async def delete_version(self, tenant: str, adapter: str, version: int) -> None:
        in_use = Conflict(f"version {version} of {adapter!r} is used by an experiment")
        try:
            async with self._sessions() as session, session.begin():
                owner = await q.tenant_row(session, tenant)
                row = await q.adapter_row(session, owner.id, adapter)
                await q.lock_adapter(session, row.id)
                target = await q.version_row(session, row, version)
                if target.is_active:
                    raise Conflict(f"version {version} of {adapter!r} is active")
                if await q.version_in_experiment(session, target.id):
                    raise in_use
                if await rollouts.uses_version(session, row.id, target.number):
                    raise Conflict(f"version {version} of {adapter!r} is a rollout's candidate")
                shas = [target.sha256, target.config_sha256]
                await session.delete(target)
        except IntegrityError:  # an experiment pinned it between our check and the delete
            raise in_use from None
        await artifacts.collect(self._sessions, self.store, shas)
        await self._changed(tenant)

    # -------------------------------------------------------------- experiments
    async def put_experiment(
        self,
        tenant: str,
        name: str,
        variants: list[VariantSpec],
        shadow: ShadowSpec | None = None,
    ) -> ExperimentView:
        view = await exp.put_experiment(self._sessions, tenant, name, variants, shadow)
        await self._changed(tenant)
        return view

    async def get_experiment(self, tenant: str, name: str) -> ExperimentView:
        async with self._sessions() as session:
            owner = await q.tenant_row(session, tenant)
            return await exp.experiment_view(session, owner.id, name)

    async def list_experiments(self, tenant: str) -> list[ExperimentView]:
        async with self._sessions() as session:
            owner = await q.tenant_row(session, tenant)
            return await exp.experiment_views(session, owner.id)

    async def delete_experiment(self, tenant: str, name: str) -> None:
        await exp.delete_experiment(self._sessions, tenant, name)
        await self._changed(tenant)

    # ----------------------------------------------------------------- rollouts
    async def start_rollout(self, tenant: str, adapter: str, spec: RolloutSpec) -> RolloutView:
        """PUT: InvalidArgument for a bad spec, NotFound for an unknown version, Conflict
        while one runs or when the version is the active one."""
        view = await rollouts.start(self._sessions, tenant, adapter, spec)
        await self._changed(tenant)
        return view

    async def get_rollout(self, tenant: str, adapter: str) -> RolloutView:
        """The running rollout, else the most recent one; NotFound when there never was one."""
        return await rollouts.latest(self._sessions, tenant, adapter)

    async def abort_rollout(self, tenant: str, adapter: str) -> RolloutView:
        """DELETE: NotFound when none is running."""
        view = await rollouts.abort(self._sessions, tenant, adapter)
        await self._changed(tenant)
        return view

    async def running_rollouts(self) -> list[RolloutView]:
        """Every tenant's running rollouts, for the gateways' decision loop and metrics."""
        return await rollouts.running(self._sessions)

    async def decide_rollout(
        self, rollout_id: int, expected_stage: int, verdict: Verdict
    ) -> RolloutView | None:
        """Advance, promote or roll back stage `expected_stage`, once across all replicas:
        the new state for the one call that applied it, None for every other."""
        view = await rollouts.decide(self._sessions, rollout_id, expected_stage, verdict)
        if view is not None:  # only the replica whose decision applied announces it
            await self._changed(view.tenant)
        return view

    # --------------------------------------------------------------- resolution
    async def resolve(self, tenant: str, model: str) -> Resolution:
        """Experiment, then adapter (active version), then `adapter@N`; NotFound otherwise.

        An unpinned adapter name with a running rollout also carries `rollout`: both arms
        and the stage's weight. A pin (`adapter@N`) bypasses it."""
        async with self._sessions() as session:
            owner = await q.tenant_row(session, tenant)
            resolver = exp.Resolver(session, self.store)
            if await q.experiment_named(session, owner.id, model):
                view = await exp.experiment_view(session, owner.id, model)
                return Resolution(
                    "experiment", experiment=await resolver.experiment(owner.id, view)
                )
            name, at, pinned = model.partition("@")
            # The length bound keeps int() below Python's 4300-digit limit, whose ValueError
            # was a 500 for a model like "name@999...9" (found by tests/security).
            if at and not (
                pinned.isascii()
                and pinned.isdigit()
                and pinned[0] != "0"
                and len(pinned) <= len(str(q.MAX_VERSION_NUMBER))
            ):
                raise NotFound(f"model {model!r} not found")
            try:
                resolved = await resolver.adapter(owner.id, name, int(pinned) if pinned else None)
            except NotFound:
                raise NotFound(f"model {model!r} not found") from None
            rollout = None
            if not at:
                rollout = await rollouts.resolve_running(session, resolver, owner.id, resolved)
            return Resolution("adapter", adapter=resolved, rollout=rollout)
