"""Fixtures the runtime's test modules share (they were copied into each module before)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hf_models import torch_threads


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Engine tests compare exact tokens and time nothing: one torch thread keeps a module's
    runs alike and leaves the other core to the processes some of them start."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model_dir(base_model_dir: Path) -> Path:
    """The built-in model, generated once per run (tests/conftest.py); tests only read it."""
    return base_model_dir
