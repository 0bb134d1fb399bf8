"""Gateway settings: the only place that reads the environment.

`Settings.from_env(**cli_overrides)` reads `LORAGATE_*` variables once; everything else gets
the frozen object passed in. Command-line flags win over the environment, which wins over
the defaults below.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


class SettingsError(ValueError):
    """A setting that cannot be parsed; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    port: int = 8000
    base_model_dir: Path | None = None  # None: the built-in model under data_dir
    device: str | None = None  # None: cuda when available, else cpu
    runtimes: tuple[str, ...] = ()  # empty: `serve` starts one runtime itself
    database_url: str = ""  # empty: sqlite+aiosqlite under data_dir (filled by from_env)
    redis_url: str | None = None  # None: single replica, in-process state
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None  # None: LocalStore under data_dir/artifacts
    s3_prefix: str = ""
    # Plaintext only in memory and only when given through the environment; never in repr.
    admin_token: str | None = field(default=None, repr=False)
    # The bearer token runtimes require (API.md "Runtimes"): gateways send it, `loragate
    # runtime` requires it. `serve` makes a fresh one for the runtime it starts.
    runtime_token: str | None = field(default=None, repr=False)
    max_adapter_bytes: int = 512 * MIB
    max_adapter_config_bytes: int = 1 * MIB
    max_lora_rank: int = 64
    max_request_bytes: int = 4 * MIB  # JSON bodies; adapter uploads have their own cap
    ratelimit_fail_open: bool = True  # availability over strictness when Redis is unreachable
    request_timeout_s: float = 300.0
    # Requests in flight per runtime before the gateway sheds (503 + Retry-After); 0 derives
    # it from each runtime's max_running (gateway/inference/router.py INFLIGHT_PER_RUNNING).
    max_inflight_per_runtime: int = 0
    # How long a verified tenant key stays cached. Without Redis no replica can hear of a
    # revocation, so the cache is capped at KEY_CACHE_TTL_WITHOUT_REDIS_S instead.
    key_cache_ttl_s: float = 60.0
    # With Redis, a cached key is trusted only if the revocation generation was read from
    # Redis at most this long ago: the bound on how late a revocation is noticed.
    revocation_check_s: float = 1.0
    # How long an answer can be scored through POST /v1/feedback after it was served.
    feedback_ttl_s: float = 7 * 24 * 3600.0
    # Without Redis: answers kept for feedback in process (the oldest go first beyond it).
    feedback_max_entries: int = 200_000
    # How often each replica's rollout decision loop looks at the running rollouts.
    rollout_tick_s: float = 1.0
    log_level: str = "INFO"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def builtin_model_dir(self) -> Path:
        return self.data_dir / "models" / "builtin"

    @property
    def base_model_path(self) -> Path:
        return self.base_model_dir if self.base_model_dir is not None else self.builtin_model_dir

    @property
    def admin_token_hash_path(self) -> Path:
        return self.data_dir / "admin_token.sha256"

    @property
    def effective_key_cache_ttl_s(self) -> float:
        if self.redis_url:
            return self.key_cache_ttl_s
        return min(self.key_cache_ttl_s, KEY_CACHE_TTL_WITHOUT_REDIS_S)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `LORAGATE_*` variables, then apply non-None `overrides`."""
        env = os.environ if environ is None else environ
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"LORAGATE_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw)
        values.update({k: _coerce(k, v) for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if not settings.database_url:
            db_path = settings.data_dir.resolve() / "catalog.db"
            settings = replace(settings, database_url=f"sqlite+aiosqlite:///{db_path}")
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("port", "max_adapter_bytes", "max_adapter_config_bytes", "max_lora_rank",
                     "max_request_bytes", "feedback_max_entries"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"LORAGATE_{name.upper()} must be positive")
        if not 0 < self.port < 65536:
            raise SettingsError("LORAGATE_PORT must be between 1 and 65535")
        if self.max_inflight_per_runtime < 0:
            raise SettingsError("LORAGATE_MAX_INFLIGHT_PER_RUNTIME must not be negative")
        if (self.request_timeout_s <= 0 or self.revocation_check_s <= 0
                or self.feedback_ttl_s <= 0 or self.rollout_tick_s <= 0):
            raise SettingsError("timeouts must be positive")
        for url in self.runtimes:
            if not url.startswith(("http://", "https://")):
                raise SettingsError(f"runtime URL must start with http:// or https://: {url!r}")


KEY_CACHE_TTL_WITHOUT_REDIS_S = 4.0

_INT = {"port", "max_adapter_bytes", "max_adapter_config_bytes", "max_lora_rank",
        "max_request_bytes", "max_inflight_per_runtime", "feedback_max_entries"}
_FLOAT = {"request_timeout_s", "key_cache_ttl_s", "revocation_check_s", "feedback_ttl_s",
          "rollout_tick_s"}
_BOOL = {"ratelimit_fail_open"}
_PATH = {"data_dir", "base_model_dir"}


def _parse(name: str, raw: str) -> Any:
    var = f"LORAGATE_{name.upper()}"
    try:
        if name in _INT:
            return int(raw)
        if name in _FLOAT:
            return float(raw)
    except ValueError:
        raise SettingsError(f"{var} must be a number, got {raw!r}") from None
    if name in _BOOL:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{var} must be true or false, got {raw!r}")
    if name in _PATH:
        return Path(raw)
    if name == "runtimes":
        return _split_urls(raw)
    return raw


def _coerce(name: str, value: Any) -> Any:
    if name in _PATH:
        return Path(value)
    if name == "runtimes" and isinstance(value, str):
        return _split_urls(value)
    if name == "runtimes":
        return tuple(value)
    return value


def _split_urls(raw: str) -> tuple[str, ...]:
    return tuple(u.strip().rstrip("/") for u in raw.split(",") if u.strip())
