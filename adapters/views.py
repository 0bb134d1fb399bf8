"""Frozen views the catalog hands out; `to_dict()` is exactly API.md's JSON for each."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

NUM_BUCKETS = 10_000  # sticky assignment: a user hashes to one of these (gateway/experiments.py)


def as_utc(moment: datetime) -> datetime:
    """An aware UTC datetime; SQLite gives naive datetimes, which we wrote as UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def iso_utc(moment: datetime) -> str:
    """ISO 8601 in UTC with a `Z`; SQLite gives naive datetimes, which we wrote as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class TenantView:
    name: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "created_at": iso_utc(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class KeyView:
    id: str
    name: str
    tenant: str
    created_at: datetime
    revoked: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "tenant": self.tenant,
            "created_at": iso_utc(self.created_at),
            "revoked": self.revoked,
        }


@dataclass(frozen=True, slots=True)
class KeyListItem:
    """One key in a tenant's key list: never its secret or its hash."""

    id: str
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "created_at": iso_utc(self.created_at),
            "expires_at": iso_utc(self.expires_at) if self.expires_at else None,
            "revoked_at": iso_utc(self.revoked_at) if self.revoked_at else None,
        }


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What authentication needs for one key prefix; the hash is of the secret part.

    `revoked` is also true for a key already expired when it was looked up. A record is
    cached by the gateway, so a key that expires later is caught by `expired(now)`, which
    the gateway checks on every request.
    """

    key_id: str
    prefix: str
    secret_hash: str
    tenant: str
    revoked: bool
    requests_per_minute: int | None
    tokens_per_minute: int | None
    expires_at: datetime | None = None  # aware, UTC; None: never

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True, slots=True)
class VersionView:
    adapter: str
    version: int
    sha256: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    created_at: datetime
    active: bool
    use_rslora: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "version": self.version,
            "sha256": self.sha256,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "size_bytes": self.size_bytes,
            "created_at": iso_utc(self.created_at),
            "active": self.active,
        }


@dataclass(frozen=True, slots=True)
class AdapterView:
    name: str
    active_version: int | None
    versions: tuple[VersionView, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "active_version": self.active_version,
            "versions": [v.to_dict() for v in self.versions],
        }


@dataclass(frozen=True, slots=True)
class AdapterRefData:
    """Everything a runtime needs to fetch and apply one adapter version.

    The runtime's cache identity (adapter_key) is not stored here: it is computed from these
    fields by the gateway's mapping to the runtime's reference (runtime_client.adapter_body),
    with the runtime's one definition of it.
    """

    sha256: str  # of adapter_model.safetensors: its content address in the store
    uri: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool


@dataclass(frozen=True, slots=True)
class ResolvedAdapter:
    name: str  # the adapter's name within its tenant
    version: int
    ref: AdapterRefData


@dataclass(frozen=True, slots=True)
class VariantSpec:
    name: str
    adapter: str
    version: int | None  # None: the active version at request time
    weight: float


@dataclass(frozen=True, slots=True)
class ShadowSpec:
    adapter: str
    version: int | None
    sample_rate: float


@dataclass(frozen=True, slots=True)
class VariantView:
    name: str
    adapter: str
    version: int | None
    weight: float
    resolved: ResolvedAdapter | None = None  # filled by Catalog.resolve only

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "adapter": self.adapter,
            "version": self.version,
            "weight": self.weight,
        }


@dataclass(frozen=True, slots=True)
class ShadowView:
    adapter: str
    version: int | None
    sample_rate: float
    resolved: ResolvedAdapter | None = None  # filled by Catalog.resolve only

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "version": self.version, "sample_rate": self.sample_rate}


@dataclass(frozen=True, slots=True)
class ExperimentView:
    id: int  # stable across PUTs of the same name: the A/B hash seed (never in to_dict)
    name: str
    variants: tuple[VariantView, ...]
    shadow: ShadowView | None
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "variants": [v.to_dict() for v in self.variants],
            "shadow": self.shadow.to_dict() if self.shadow else None,
        }


RolloutState = Literal["running", "promoted", "rolled_back", "aborted"]
DEFAULT_STAGES: tuple[float, ...] = (5, 25, 50, 100)


@dataclass(frozen=True, slots=True)
class Guardrails:
    """A stage passes when the candidate, against the stable arm over that stage, has an
    error rate at most `max_error_rate` above the stable one, a p95 latency at most
    `max_latency_p95_ratio` times the stable one, and (when both arms got feedback) a mean
    score at least `min_score_delta` away from the stable one (negative: may be worse)."""

    max_error_rate: float = 0.02
    max_latency_p95_ratio: float = 1.5
    min_score_delta: float = -0.05

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_error_rate": self.max_error_rate,
            "max_latency_p95_ratio": self.max_latency_p95_ratio,
            "min_score_delta": self.min_score_delta,
        }


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """The body of `PUT .../rollout`; everything but the version has API.md's default."""

    version: int
    stages: tuple[float, ...] = DEFAULT_STAGES  # candidate share in percent, per stage
    stage_seconds: float = 600
    min_requests: int = 100  # per arm and stage
    guardrails: Guardrails = Guardrails()


@dataclass(frozen=True, slots=True)
class RolloutEventView:
    at: datetime
    action: Literal["started", "advanced", "promoted", "rolled_back", "aborted"]
    stage: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"at": iso_utc(self.at), "action": self.action, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class RolloutView:
    id: int  # the sticky hash seed (see ResolvedRollout.hash_seed); never in to_dict
    tenant: str
    adapter: str
    version: int  # the candidate
    from_version: int  # the active version when the rollout started
    state: RolloutState
    stage: int  # index into stages
    stages: tuple[float, ...]
    stage_seconds: float
    min_requests: int
    guardrails: Guardrails
    stage_started_at: datetime  # aware, UTC
    created_at: datetime
    updated_at: datetime
    history: tuple[RolloutEventView, ...] = ()

    @property
    def weight(self) -> float:
        """The candidate's share of users now: the stage's while running, 100 once promoted,
        0 once rolled back or aborted."""
        if self.state == "running":
            return self.stages[self.stage]
        return 100 if self.state == "promoted" else 0

    @property
    def last_stage(self) -> bool:
        return self.stage == len(self.stages) - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "version": self.version,
            "from_version": self.from_version,
            "state": self.state,
            "stage": self.stage,
            "weight": self.weight,
            "stages": list(self.stages),
            "stage_seconds": self.stage_seconds,
            "min_requests": self.min_requests,
            "guardrails": self.guardrails.to_dict(),
            "stage_started_at": iso_utc(self.stage_started_at),
            "created_at": iso_utc(self.created_at),
            "updated_at": iso_utc(self.updated_at),
            "history": [e.to_dict() for e in self.history],
        }


@dataclass(frozen=True, slots=True)
class ResolvedRollout:
    """A running rollout as `model: <adapter>` sees it: both arms resolved to runtime refs.

    Users are sticky: a user whose bucket is below the weight stays on the candidate as the
    weight grows, because the candidate's buckets are always the lowest ones.
    """

    id: int
    stage: int
    weight: float  # percent of users on the candidate
    stable: ResolvedAdapter  # the active version at resolution time
    candidate: ResolvedAdapter

    @property
    def hash_seed(self) -> str:
        # Not the bare id: experiments seed with their own ids, from another table.
        return f"rollout:{self.id}"

    def arm(self, bucket: int) -> Literal["stable", "candidate"]:
        """The arm of a user in `bucket` (0 .. NUM_BUCKETS-1), by the bucket's midpoint."""
        return "candidate" if (bucket + 0.5) * 100 / NUM_BUCKETS < self.weight else "stable"


@dataclass(frozen=True, slots=True)
class Resolution:
    kind: Literal["experiment", "adapter", "base"]
    adapter: ResolvedAdapter | None = None
    experiment: ExperimentView | None = None
    # Only for an unpinned adapter name with a running rollout; `adapter` is then the
    # stable arm, so a caller that ignores rollouts serves the active version as before.
    rollout: ResolvedRollout | None = None
