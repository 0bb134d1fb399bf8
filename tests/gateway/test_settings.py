"""Settings: the environment, command-line overrides over it, defaults, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import Settings, SettingsError

pytestmark = pytest.mark.unit


def test_defaults_put_the_catalog_and_artifacts_under_the_data_dir(tmp_path: Path) -> None:
    settings = Settings.from_env(environ={}, data_dir=tmp_path)
    assert settings.database_url == f"sqlite+aiosqlite:///{tmp_path.resolve()}/catalog.db"
    assert settings.artifacts_dir == tmp_path / "artifacts"
    assert settings.base_model_path == tmp_path / "models" / "builtin"
    assert settings.max_adapter_bytes == 512 * 1024 * 1024
    assert settings.max_lora_rank == 64
    assert settings.redis_url is None and settings.s3_bucket is None
    assert settings.runtimes == ()


def test_environment_is_read_and_flags_win(tmp_path: Path) -> None:
    env = {
        "LORAGATE_DATA_DIR": str(tmp_path / "from-env"),
        "LORAGATE_PORT": "9000",
        "LORAGATE_DATABASE_URL": "postgresql+asyncpg://db/loragate",
        "LORAGATE_REDIS_URL": "redis://127.0.0.1:6379/0",
        "LORAGATE_S3_BUCKET": "artifacts",
        "LORAGATE_S3_PREFIX": "prod",
        "LORAGATE_MAX_ADAPTER_BYTES": "1024",
        "LORAGATE_MAX_LORA_RANK": "16",
        "LORAGATE_RUNTIMES": "http://a:8100/, http://b:8100",
        "LORAGATE_RATELIMIT_FAIL_OPEN": "false",
        "LORAGATE_ADMIN_TOKEN": "from-env-token",
    }
    settings = Settings.from_env(environ=env, port=8001, runtimes="http://c:8100")
    assert settings.data_dir == tmp_path / "from-env"
    assert settings.port == 8001
    assert settings.runtimes == ("http://c:8100",)
    assert settings.database_url == "postgresql+asyncpg://db/loragate"
    assert (settings.s3_bucket, settings.s3_prefix) == ("artifacts", "prod")
    assert (settings.max_adapter_bytes, settings.max_lora_rank) == (1024, 16)
    assert settings.ratelimit_fail_open is False
    assert settings.admin_token == "from-env-token"
    from_env_runtimes = Settings.from_env(environ=env)
    assert from_env_runtimes.runtimes == ("http://a:8100", "http://b:8100")


def test_none_overrides_leave_the_environment_alone() -> None:
    settings = Settings.from_env(environ={"LORAGATE_HOST": "0.0.0.0"}, host=None)
    assert settings.host == "0.0.0.0"


def test_key_cache_is_capped_without_redis() -> None:
    without = Settings.from_env(environ={}, key_cache_ttl_s=600.0)
    with_redis = Settings.from_env(environ={}, key_cache_ttl_s=600.0, redis_url="redis://x")
    assert without.effective_key_cache_ttl_s < 5.0
    assert with_redis.effective_key_cache_ttl_s == 600.0


@pytest.mark.parametrize(
    "env",
    [
        {"LORAGATE_PORT": "eighty"},
        {"LORAGATE_PORT": "70000"},
        {"LORAGATE_MAX_ADAPTER_BYTES": "0"},
        {"LORAGATE_RATELIMIT_FAIL_OPEN": "maybe"},
        {"LORAGATE_RUNTIMES": "ftp://runtime"},
    ],
)
def test_bad_values_name_their_variable(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="LORAGATE_|runtime URL"):
        Settings.from_env(environ=env)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(SettingsError, match="unknown"):
        Settings.from_env(environ={}, colour="blue")
