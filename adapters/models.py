"""SQL catalog tables (SQLAlchemy 2.0 typed declarative), shared by SQLite and PostgreSQL.

Invariants held by the schema itself, not only by the services:
- tenant names are unique; adapter names unique per tenant; experiment names unique per
  tenant; version numbers unique per adapter; key prefixes unique;
- at most one active version per adapter (a partial unique index on both databases);
- a variant's or shadow's pinned version belongs to the adapter it names (composite FKs
  onto ``adapter_versions (adapter_id, id)``);
- weights are non-negative, sample rates in [0, 1], ranks and numbers positive;
- at most one running rollout per adapter (a partial unique index), its state one of
  ROLLOUT_STATES, its guardrails in range, its candidate not its stable version.
The rules that span rows (weights sum positive; experiment names not equal to an adapter
name) and the shape of a rollout's stages (a JSON list) live in the services.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAME_LENGTH = 63  # API.md: ^[a-z0-9][a-z0-9._-]{0,62}$

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (
        UniqueConstraint("name"),
        CheckConstraint("requests_per_minute IS NULL OR requests_per_minute > 0", name="rpm"),
        CheckConstraint("tokens_per_minute IS NULL OR tokens_per_minute > 0", name="tpm"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("prefix"), Index(None, "tenant_id"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # "key_<hex>", public
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    prefix: Mapped[str] = mapped_column(String(32))
    secret_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the secret part
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # None: never expires. An expired key is refused like a revoked one (API.md).
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        CheckConstraint("next_version > 0", name="next_version_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    # The number the next upload takes. Incremented by an UPDATE that is the first write of
    # the upload's transaction, so concurrent uploads serialize on this row.
    next_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "number"),
        # Target of the composite FKs that tie a pinned version to its adapter.
        UniqueConstraint("adapter_id", "id"),
        CheckConstraint("number > 0", name="number_positive"),
        CheckConstraint("rank > 0", name="rank_positive"),
        CheckConstraint("alpha > 0", name="alpha_positive"),
        CheckConstraint("size_bytes >= 0", name="size_nonnegative"),
        CheckConstraint("length(sha256) = 64", name="sha256_hex"),
        Index(
            "uq_adapter_versions_one_active",
            "adapter_id",
            unique=True,
            sqlite_where=text("is_active"),
            postgresql_where=text("is_active"),
        ),
        Index(None, "sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))  # adapter_key of the safetensors
    config_sha256: Mapped[str] = mapped_column(String(64))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    use_rslora: Mapped[bool] = mapped_column(Boolean, default=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    is_active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Experiment(Base):
    __tablename__ = "experiments"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        ForeignKeyConstraint(
            ["shadow_adapter_id", "shadow_version_id"],
            ["adapter_versions.adapter_id", "adapter_versions.id"],
            ondelete="RESTRICT",
        ),
        CheckConstraint(
            "(shadow_adapter_id IS NULL AND shadow_version_id IS NULL"
            " AND shadow_sample_rate IS NULL) OR (shadow_adapter_id IS NOT NULL"
            " AND shadow_sample_rate >= 0 AND shadow_sample_rate <= 1)",
            name="shadow_complete",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    shadow_adapter_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapters.id", ondelete="RESTRICT")
    )
    shadow_version_id: Mapped[int | None] = mapped_column(Integer)  # None: active version
    shadow_sample_rate: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ExperimentVariant(Base):
    __tablename__ = "experiment_variants"
    __table_args__ = (
        UniqueConstraint("experiment_id", "name"),
        UniqueConstraint("experiment_id", "position"),
        ForeignKeyConstraint(
            ["adapter_id", "version_id"],
            ["adapter_versions.adapter_id", "adapter_versions.id"],
            ondelete="RESTRICT",
        ),
        CheckConstraint("weight >= 0", name="weight_nonnegative"),
        Index(None, "adapter_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)  # order as given in the PUT body
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="RESTRICT"))
    version_id: Mapped[int | None] = mapped_column(Integer)  # None: active at request time
    weight: Mapped[float] = mapped_column(Float)


ROLLOUT_STATES = ("running", "promoted", "rolled_back", "aborted")
ROLLOUT_ACTIONS = ("started", "advanced", "promoted", "rolled_back", "aborted")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Rollout(Base):
    """A canary that drives itself through `stages` (candidate share in percent).

    The versions are kept as numbers, not foreign keys: a finished rollout's record must
    outlive its versions (a rolled-back candidate may be deleted, its history stays). While
    it runs, the services keep its candidate from being deleted. The tenant is reached
    through the adapter, so the two can never disagree.
    """

    __tablename__ = "rollouts"
    __table_args__ = (
        CheckConstraint(_one_of("state", ROLLOUT_STATES), name="state"),
        CheckConstraint("version > 0 AND from_version > 0", name="versions_positive"),
        CheckConstraint("version <> from_version", name="candidate_not_stable"),
        CheckConstraint("stage >= 0", name="stage_nonnegative"),
        CheckConstraint("stage_seconds > 0", name="stage_seconds_positive"),
        CheckConstraint("min_requests >= 0", name="min_requests_nonnegative"),
        CheckConstraint("max_error_rate >= 0 AND max_error_rate <= 1", name="max_error_rate"),
        CheckConstraint("max_latency_p95_ratio > 0", name="max_latency_p95_ratio"),
        CheckConstraint("min_score_delta >= -1 AND min_score_delta <= 1", name="min_score_delta"),
        Index(
            "uq_rollouts_one_running",
            "adapter_id",
            unique=True,
            sqlite_where=text("state = 'running'"),
            postgresql_where=text("state = 'running'"),
        ),
        # The decision loop of every gateway lists the running rollouts.
        Index(None, "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)  # the candidate
    from_version: Mapped[int] = mapped_column(Integer)  # the active version at the start
    stages: Mapped[list[float]] = mapped_column(JSON)  # strictly ascending, each in (0, 100]
    stage_seconds: Mapped[float] = mapped_column(Float)
    min_requests: Mapped[int] = mapped_column(Integer)
    max_error_rate: Mapped[float] = mapped_column(Float)
    max_latency_p95_ratio: Mapped[float] = mapped_column(Float)
    min_score_delta: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), default="running")
    stage: Mapped[int] = mapped_column(Integer, default=0)  # index into stages
    stage_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RolloutEvent(Base):
    """One line of a rollout's history, written in the transaction of the change it records.

    A table rather than a JSON column on `rollouts`: a decision appends one row next to its
    conditional UPDATE instead of rewriting the whole history, and rows keep their order by id.
    """

    __tablename__ = "rollout_events"
    __table_args__ = (
        CheckConstraint(_one_of("action", ROLLOUT_ACTIONS), name="action"),
        Index(None, "rollout_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    action: Mapped[str] = mapped_column(String(16))
    stage: Mapped[int] = mapped_column(Integer)  # the stage the action ended or began
    reason: Mapped[str] = mapped_column(String(500))


class ArtifactLock(Base):
    """The row an upload and the garbage collector of the same stored object serialize on.

    Not a list of objects: a row exists from the first upload (or collection) that touched
    its sha256 until the collector removes the object. See adapters/artifacts.py.
    """

    __tablename__ = "artifact_locks"
    __table_args__ = (CheckConstraint("length(sha256) = 64", name="sha256_hex"),)

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    touched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
