"""msgspec Structs of the admin API: `XCreate`/`XUpdate` in, `X` out (shapes of API.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from adapters.queries import NAME_RE

NAME_PATTERN = f"^{NAME_RE.pattern}$"  # the catalog's rule, checked here before any I/O
Name = Annotated[str, Meta(pattern=NAME_PATTERN, description=NAME_PATTERN)]
PerMinute = Annotated[int, Meta(ge=1, le=1_000_000_000)]
VersionNumber = Annotated[int, Meta(ge=1)]


class TenantCreate(Struct, forbid_unknown_fields=True):
    name: Name
    requests_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None


class TenantUpdate(Struct, forbid_unknown_fields=True):
    """PATCH: a field left out keeps its value; null means no limit."""

    requests_per_minute: PerMinute | None | UnsetType = UNSET
    tokens_per_minute: PerMinute | None | UnsetType = UNSET

    def changes(self) -> dict[str, int | None]:
        return {name: value for name in self.__struct_fields__
                if (value := getattr(self, name)) is not UNSET}


class Tenant(Struct):
    name: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    created_at: str


class KeyCreate(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=100)] = "default"
    expires_at: datetime | None = None  # RFC 3339 with an offset; the catalog checks it


class KeyCreated(Struct):
    id: str
    name: str
    key: str  # shown this once; only its hash is stored
    tenant: str
    created_at: str
    expires_at: str | None = None


class KeyListed(Struct):
    """A key as GET .../keys lists it: never its secret or hash."""

    id: str
    name: str
    prefix: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None


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
    feedback_count: int = 0
    feedback_mean: float | None = None
    feedback_ci95: list[float] | None = None  # [low, high]: mean +- 1.96 s / sqrt(n)
    # Welch's t-test of this variant's mean score against the first variant's.
    feedback_test: FeedbackTest | None = None


class FeedbackTest(Struct):
    against: str
    t: float
    df: float
    p_value: float


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


class GuardrailsCreate(Struct, forbid_unknown_fields=True):
    max_error_rate: float = 0.02
    max_latency_p95_ratio: float = 1.5
    min_score_delta: float = -0.05


class RolloutCreate(Struct, forbid_unknown_fields=True):
    """PUT .../rollout; the catalog checks every range (adapters/rollouts.py check_spec)."""

    version: VersionNumber
    stages: list[float] = msgspec.field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0])
    stage_seconds: float = 600.0
    min_requests: int = 100
    guardrails: GuardrailsCreate = msgspec.field(default_factory=GuardrailsCreate)


class ArmFigures(Struct):
    requests: int = 0
    errors: int = 0
    p95_latency_ms: float | None = None
    feedback_count: int = 0
    feedback_mean: float | None = None
    feedback_ci95: list[float] | None = None


class StageFigures(Struct):
    stage: int
    weight: float
    stable: ArmFigures
    candidate: ArmFigures


class RolloutEvent(Struct):
    at: str
    action: str
    reason: str


class Rollout(Struct):
    adapter: str
    version: int
    from_version: int
    state: str
    stage: int
    weight: float
    stages: list[float]
    stage_seconds: float
    min_requests: int
    guardrails: GuardrailsCreate
    stage_started_at: str
    created_at: str
    updated_at: str
    history: list[RolloutEvent]
    stable: ArmFigures  # the current stage (the last one once it ended)
    candidate: ArmFigures
    stage_figures: list[StageFigures]  # every stage reached, first to current


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
