"""msgspec Structs of the admin API: `XCreate`/`XUpdate` in, `X` out (shapes of API.md)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from adapters.queries import NAME_RE

NAME_PATTERN = f"^{NAME_RE.pattern}$"  # the catalog's rule, checked here before any I/O
Name = Annotated[str, Meta(pattern=NAME_PATTERN, description=NAME_PATTERN)]
PerMinute = Annotated[int, Meta(ge=1, le=1_000_000_000)]
VersionNumber = Annotated[int, Meta(ge=1)]


class TenantCreate(Struct, forbid_unknown_fields=True):
    name: Name
    requests_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None


class Tenant(Struct):
    name: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    created_at: str


class KeyCreate(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=100)] = "default"


class KeyCreated(Struct):
    id: str
    name: str
    key: str  # shown this once; only its hash is stored
    tenant: str
    created_at: str


class Version(Struct):
    adapter: str
    version: int
    sha256: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    created_at: str
    active: bool


class Adapter(Struct):
    name: str
    active_version: int | None
    versions: list[Version]


class AdapterActivate(Struct, forbid_unknown_fields=True):
    version: VersionNumber


class VariantCreate(Struct, forbid_unknown_fields=True):
    name: Name
    adapter: Name
    weight: Annotated[float, Meta(ge=0)]
    version: VersionNumber | None = None  # None: the active version at request time


class ShadowCreate(Struct, forbid_unknown_fields=True):
    adapter: Name
    sample_rate: Annotated[float, Meta(ge=0, le=1)]
    version: VersionNumber | None = None


class ExperimentUpdate(Struct, forbid_unknown_fields=True):
    variants: Annotated[list[VariantCreate], Meta(min_length=1, max_length=16)]
    shadow: ShadowCreate | None = None


class VariantFigures(Struct):
    requests: int = 0
    errors: int = 0
    p50_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    tokens: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    identical_share: float | None = None  # shadow only: outputs identical to the primary's


class Variant(Struct):
    name: str
    adapter: str
    version: int | None
    weight: float
    figures: VariantFigures = msgspec.field(default_factory=VariantFigures)


class Shadow(Struct, omit_defaults=True):
    adapter: str
    version: int | None
    sample_rate: float
    figures: VariantFigures | None = None  # once a shadow copy has been recorded


class Experiment(Struct):
    name: str
    variants: list[Variant]
    shadow: Shadow | None


SHADOW_FIGURES = ":shadow"  # the shadow's row in the figures (no variant name has ':')


def experiment_out(view_dict: dict[str, Any], figures: dict[str, dict[str, Any]]) -> Experiment:
    """An experiment view with each variant's figures (zeros for a variant not yet served)."""
    experiment = msgspec.convert(view_dict, Experiment)
    for variant in experiment.variants:
        if variant.name in figures:
            variant.figures = msgspec.convert(figures[variant.name], VariantFigures)
    if experiment.shadow is not None and SHADOW_FIGURES in figures:
        experiment.shadow.figures = msgspec.convert(figures[SHADOW_FIGURES], VariantFigures)
    return experiment
