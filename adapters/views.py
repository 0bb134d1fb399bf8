"""Frozen views the catalog hands out; `to_dict()` is exactly API.md's JSON for each."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal


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
class KeyRecord:
    """What authentication needs for one key prefix; the hash is of the secret part."""

    key_id: str
    prefix: str
    secret_hash: str
    tenant: str
    revoked: bool
    requests_per_minute: int | None
    tokens_per_minute: int | None


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
    """Everything a runtime needs to fetch and apply one adapter version."""

    key: str  # sha256 of the safetensors: the runtime's adapter_key
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


@dataclass(frozen=True, slots=True)
class Resolution:
    kind: Literal["experiment", "adapter", "base"]
    adapter: ResolvedAdapter | None = None
    experiment: ExperimentView | None = None
