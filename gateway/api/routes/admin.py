"""Admin API of API.md: tenants, keys, adapter versions, experiments, rollouts. Admin token
only.

Thin handlers: parse with the Structs of gateway/api/schemas/admin.py, call the catalog,
convert its views. Every catalog error becomes an HTTP answer through gateway/errors.py's
table. The catalog announces its own changes (caches of resolutions listen at composition).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, patch, post, put
from litestar.di import NamedDependency
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import JSONBody, Parameter, PathParameter

from adapters.errors import Conflict
from adapters.queries import NAME_RE
from adapters.views import (
    ExperimentView,
    Guardrails,
    RolloutSpec,
    ShadowSpec,
    VariantSpec,
    iso_utc,
)
from gateway.api.schemas.admin import (
    NAME_PATTERN,
    Adapter,
    AdapterActivate,
    Experiment,
    ExperimentUpdate,
    KeyCreate,
    KeyCreated,
    KeyListed,
    Rollout,
    RolloutCreate,
    Tenant,
    TenantCreate,
    TenantUpdate,
    Version,
    experiment_out,
)
from gateway.api.schemas.openapi import body_operation
from gateway.api.schemas.strict import decode_json
from gateway.api.uploads import CONFIG_PART, MODEL_PART, receive_adapter_upload
from gateway.auth import require_admin
from gateway.errors import BadRequest
from gateway.inference.experiments import stats_key
from gateway.inference.feedback import experiment_scores
from gateway.inference.rollouts import rollout_figures
from gateway.services import Services


def _binary_part(description: str) -> Schema:
    return Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY, description=description)


@dataclass
class _UploadOperation(Operation):
    """The upload reads its multipart body itself (streamed, size-capped), so Litestar cannot
    derive the request body's schema from a `data` argument: it is declared here."""

    def __post_init__(self) -> None:
        form = Schema(
            type=OpenAPIType.OBJECT,
            required=[CONFIG_PART, MODEL_PART],
            properties={
                CONFIG_PART: _binary_part("adapter_config.json as PEFT writes it"),
                MODEL_PART: _binary_part("adapter_model.safetensors"),
            },
        )
        self.request_body = RequestBody(
            content={"multipart/form-data": OpenAPIMediaType(schema=form)}, required=True
        )


def _refuse_folded_names(request: Request[Any, Any, Any]) -> None:
    """Litestar routes on the percent-decoded path and folds empty segments, so
    `/admin/tenants/%2Facme` and `/admin/tenants//acme` both addressed tenant `acme`, and
    `PUT .../experiments/%2Fab` created an experiment named `ab`: a name that breaks API.md's
    naming rule silently became another, valid one. Names never contain '/' and are never
    empty, so such paths are refused (found by tests/security/test_names.py)."""
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    if b"%2f" in raw.lower() or b"//" in raw:
        raise BadRequest("malformed path: a name may not contain '/' or be empty", param="path")


async def _strict_body(request: Request[Any, Any, Any]) -> None:
    """Litestar converts a `data` body leniently (`"10"` becomes 10, and a body nested 1,000
    deep escapes as a 500), while the tenant API refuses both: the raw body is decoded here
    first, strictly, against the handler's own Struct, so admin bodies answer the same 400s.
    An empty body is left to Litestar, as before."""
    data = request.route_handler.parsed_fn_signature.parameters.get("data")
    kind = data.annotation if data is not None else None
    if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
        return
    raw = await request.body()
    if raw.strip():
        decode_json(raw, kind)


async def _before_request(request: Request[Any, Any, Any]) -> None:
    _refuse_folded_names(request)
    await _strict_body(request)


def _not_the_base_model(services: Services, name: str) -> None:
    """A tenant's experiments resolve before the base model's id (API.md's order), so one
    named like it would hide the base model from the tenant: a conflict. (An adapter may
    take the name: it is a model of its own, served by name, as tests/gateway/test_openai.py
    pins; an experiment only points at adapters.)"""
    if name == services.resolver.base_model_id:
        raise Conflict(f"an experiment may not be named like the base model ({name!r})")


async def _experiment(services: Services, tenant: str, view: ExperimentView) -> Experiment:
    """The experiment with each variant's traffic and feedback figures."""
    figures = await services.experiment_stats.figures(tenant, stats_key(view))
    names = [v.name for v in view.variants]
    scores = await experiment_scores(services.answers.scores, tenant, view.id, names)
    for name, extra in scores.items():
        figures[name] = {**figures.get(name, {}), **extra}
    return experiment_out(view.to_dict(), figures)


Svc = NamedDependency[Services]
PathStr = Annotated[str, PathParameter()]
PathInt = Annotated[int, PathParameter()]


class AdminController(Controller):
    path = "/admin"
    # Litestar reads these as class attributes.
    guards = [require_admin]
    tags = ["admin"]
    security = [{"bearer": []}]
    before_request = staticmethod(_before_request)

    # ------------------------------------------------------------------ tenants and keys

    @post("/tenants", status_code=201)
    async def create_tenant(self, data: JSONBody[TenantCreate], services: Svc) -> Tenant:
        view = await services.catalog.create_tenant(
            data.name,
            requests_per_minute=data.requests_per_minute,
            tokens_per_minute=data.tokens_per_minute,
        )
        return msgspec.convert(view.to_dict(), Tenant)

    @get("/tenants")
    async def list_tenants(self, services: Svc) -> list[Tenant]:
        views = await services.catalog.list_tenants()
        return [msgspec.convert(v.to_dict(), Tenant) for v in views]

    @get("/tenants/{tenant:str}")
    async def get_tenant(self, tenant: PathStr, services: Svc) -> Tenant:
        view = await services.catalog.get_tenant(tenant)
        return msgspec.convert(view.to_dict(), Tenant)

    @patch("/tenants/{tenant:str}", operation_class=body_operation(TenantUpdate))
    async def update_tenant(
        self, request: Request[Any, Any, Any], tenant: PathStr, services: Svc
    ) -> Tenant:
        # Read by hand: a field left out and a field set to null mean different things.
        changes = decode_json(await request.body(), TenantUpdate).changes()
        view = await services.catalog.update_tenant(tenant, changes)
        # Cached key records carry the limits: drop them so the new ones apply at once.
        await services.auth.key_revoked()
        return msgspec.convert(view.to_dict(), Tenant)

    @delete("/tenants/{tenant:str}", status_code=204)
    async def delete_tenant(self, tenant: PathStr, services: Svc) -> None:
        await services.catalog.delete_tenant(tenant)
        await services.auth.key_revoked()  # its keys stop working on every replica

    @post("/tenants/{tenant:str}/keys", status_code=201)
    async def create_key(
        self, tenant: PathStr, data: JSONBody[KeyCreate], services: Svc
    ) -> KeyCreated:
        view, plaintext = await services.catalog.create_key(tenant, data.name, data.expires_at)
        expires_at = iso_utc(data.expires_at) if data.expires_at is not None else None
        return msgspec.convert({**view.to_dict(), "key": plaintext, "expires_at": expires_at},
                               KeyCreated)

    @get("/tenants/{tenant:str}/keys")
    async def list_keys(self, tenant: PathStr, services: Svc) -> list[KeyListed]:
        return [msgspec.convert(k.to_dict(), KeyListed)
                for k in await services.catalog.list_keys(tenant)]

    @delete("/keys/{key_id:str}", status_code=204)
    async def revoke_key(self, key_id: PathStr, services: Svc) -> None:
        await services.catalog.revoke_key(key_id)
        # Verified keys are cached by auth on every replica, apart from the catalog's caches.
        await services.auth.key_revoked()

    # ------------------------------------------------------------- adapters and versions

    @post(
        "/tenants/{tenant:str}/adapters/{adapter:str}/versions",
        status_code=201,
        request_max_body_size=None,  # gateway/api/uploads.py enforces LORAGATE_MAX_ADAPTER_BYTES
        operation_class=_UploadOperation,
    )
    async def upload_version(
        self,
        request: Request[Any, Any, Any],
        tenant: PathStr,
        adapter: PathStr,
        services: Svc,
        activate: bool | None = Parameter(
            default=None, description="make this version active (the first one always is)"
        ),
    ) -> Version:
        """multipart/form-data with parts `adapter_config` (adapter_config.json) and
        `adapter_model` (adapter_model.safetensors). Part filenames are ignored."""
        # Refuse what the catalog would refuse before reading a body of up to 512 MiB.
        if NAME_RE.fullmatch(adapter) is None:
            raise BadRequest(f"adapter name must match {NAME_PATTERN}", param="adapter")
        await services.catalog.get_tenant(tenant)
        settings = services.settings
        async with receive_adapter_upload(
            request,
            settings.data_dir / "uploads",
            max_config_bytes=settings.max_adapter_config_bytes,
            max_model_bytes=settings.max_adapter_bytes,
        ) as upload:
            view = await services.catalog.upload_version(
                tenant, adapter, upload.config_path, upload.model_path, activate=activate
            )
        return msgspec.convert(view.to_dict(), Version)

    @get("/tenants/{tenant:str}/adapters")
    async def list_adapters(self, tenant: PathStr, services: Svc) -> list[Adapter]:
        views = await services.catalog.list_adapters(tenant)
        return [msgspec.convert(v.to_dict(), Adapter) for v in views]

    @post("/tenants/{tenant:str}/adapters/{adapter:str}/activate", status_code=200)
    async def activate(
        self, tenant: PathStr, adapter: PathStr, data: JSONBody[AdapterActivate], services: Svc
    ) -> Adapter:
        view = await services.catalog.activate(tenant, adapter, data.version)
        return msgspec.convert(view.to_dict(), Adapter)

    @delete("/tenants/{tenant:str}/adapters/{adapter:str}", status_code=204)
    async def delete_adapter(self, tenant: PathStr, adapter: PathStr, services: Svc) -> None:
        await services.catalog.delete_adapter(tenant, adapter)

    @delete("/tenants/{tenant:str}/adapters/{adapter:str}/versions/{version:int}", status_code=204)
    async def delete_version(
        self, tenant: PathStr, adapter: PathStr, version: PathInt, services: Svc
    ) -> None:
        await services.catalog.delete_version(tenant, adapter, version)

    # ---------------------------------------------------------------------- experiments

    @put("/tenants/{tenant:str}/experiments/{name:str}")
    async def put_experiment(
        self, tenant: PathStr, name: PathStr, data: JSONBody[ExperimentUpdate], services: Svc
    ) -> Experiment:
        variants = [VariantSpec(v.name, v.adapter, v.version, v.weight) for v in data.variants]
        shadow = (
            ShadowSpec(data.shadow.adapter, data.shadow.version, data.shadow.sample_rate)
            if data.shadow is not None
            else None
        )
        _not_the_base_model(services, name)
        view = await services.catalog.put_experiment(tenant, name, variants, shadow)
        return await _experiment(services, tenant, view)

    @get("/tenants/{tenant:str}/experiments")
    async def list_experiments(self, tenant: PathStr, services: Svc) -> list[Experiment]:
        return [await _experiment(services, tenant, view)
                for view in await services.catalog.list_experiments(tenant)]

    @get("/tenants/{tenant:str}/experiments/{name:str}")
    async def get_experiment(self, tenant: PathStr, name: PathStr, services: Svc) -> Experiment:
        view = await services.catalog.get_experiment(tenant, name)
        return await _experiment(services, tenant, view)

    @delete("/tenants/{tenant:str}/experiments/{name:str}", status_code=204)
    async def delete_experiment(self, tenant: PathStr, name: PathStr, services: Svc) -> None:
        view = await services.catalog.get_experiment(tenant, name)
        await services.catalog.delete_experiment(tenant, name)
        await services.experiment_stats.forget(tenant, stats_key(view))

    # ------------------------------------------------------------------------- rollouts

    @put("/tenants/{tenant:str}/adapters/{adapter:str}/rollout")
    async def start_rollout(
        self, tenant: PathStr, adapter: PathStr, data: JSONBody[RolloutCreate], services: Svc
    ) -> Rollout:
        g = data.guardrails
        spec = RolloutSpec(
            data.version, tuple(data.stages), data.stage_seconds, data.min_requests,
            Guardrails(g.max_error_rate, g.max_latency_p95_ratio, g.min_score_delta),
        )
        view = await services.catalog.start_rollout(tenant, adapter, spec)
        return msgspec.convert(
            {**view.to_dict(), **await rollout_figures(services.rollout_stats, view)}, Rollout)

    @get("/tenants/{tenant:str}/adapters/{adapter:str}/rollout")
    async def get_rollout(self, tenant: PathStr, adapter: PathStr, services: Svc) -> Rollout:
        view = await services.catalog.get_rollout(tenant, adapter)
        return msgspec.convert(
            {**view.to_dict(), **await rollout_figures(services.rollout_stats, view)}, Rollout)

    @delete("/tenants/{tenant:str}/adapters/{adapter:str}/rollout", status_code=204)
    async def abort_rollout(self, tenant: PathStr, adapter: PathStr, services: Svc) -> None:
        await services.catalog.abort_rollout(tenant, adapter)


routes = [AdminController]
