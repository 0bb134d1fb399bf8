"""Fixtures of the gateway tests: real PEFT adapters and an app per test (the built-in model is
the session fixture `base_model_dir` of tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from adapters.db import upgrade_database
from gateway.app import create_app
from gateway.settings import Settings
from tests.support.gw_helpers import make_peft_adapter, make_settings
from tests.support.stub_procs import start_stub, stop


@pytest.fixture(scope="session")
def peft_adapter(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapters") / "support"
    return make_peft_adapter(base_model_dir, out, rank=8, alpha=16,
                             target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="session")
def peft_adapter_v2(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapters") / "support-v2"
    return make_peft_adapter(base_model_dir, out, rank=4, alpha=8,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"], seed=1)


@pytest.fixture
def settings(tmp_path: Path, base_model_dir: Path) -> Settings:
    return make_settings(tmp_path / "data", base_model_dir)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    upgrade_database(settings.database_url)
    async with AsyncTestClient(create_app(settings)) as test_client:
        yield test_client


# A stub runtime per test module, and a gateway over it per test (tests that need no real model).
@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    proc, url = start_stub()
    yield url
    stop(proc)


@pytest.fixture
def gw_settings_overrides() -> dict[str, Any]:
    """Settings fields a module's `gw` takes beyond the defaults (override it in the module)."""
    return {}


@pytest.fixture
async def gw(tmp_path: Path, base_model_dir: Path, stub_url: str,
             gw_settings_overrides: dict[str, Any]) -> AsyncIterator[AsyncTestClient[Any]]:
    settings = make_settings(tmp_path / "data", base_model_dir, runtimes=(stub_url,),
                             **gw_settings_overrides)
    upgrade_database(settings.database_url)
    async with AsyncTestClient(create_app(settings)) as client:
        yield client
