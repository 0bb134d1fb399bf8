"""The package boundaries of DESIGN.md, checked by import-linter on every test run."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_import_contracts_hold() -> None:
    lint_imports = shutil.which("lint-imports") or str(
        Path(sys.executable).with_name("lint-imports")
    )
    result = subprocess.run(
        [lint_imports, str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.unit
def test_scheduler_and_cache_policy_stay_free_of_torch() -> None:
    # DESIGN.md: the scheduler and the adapter cache's policy run without torch.
    # The response_format check runs in the HTTP app before queueing: llguidance, no torch.
    code = (
        "import sys, runtime.scheduling.scheduler, runtime.lora.cache, runtime.lora.protocol,"
        " runtime.types, runtime.structured;"
        "from runtime.types import SamplingParams;"
        "runtime.structured.grammar_text(SamplingParams(response_format='json_object'));"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
