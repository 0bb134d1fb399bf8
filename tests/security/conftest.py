"""Fixtures of the security checks: base model facts, adapter files, a capped stub runtime,
and a report of fuzz counts printed at the end of the run (`make fuzz-api`,
`make fuzz-adapters`).

`LORAGATE_FUZZ_EXAMPLES` sets the examples per fuzzed operation or property; the default is
small so that `make test` stays fast, the make targets raise it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.sec_helpers import REPORT

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORT:
        terminalreporter.section("security fuzz counts")
        for line in REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def base_spec(base_model_dir: Path) -> Any:
    from adapters.base_model import BaseModelSpec

    return BaseModelSpec.from_config_file(base_model_dir / "config.json")


@pytest.fixture(scope="session")
def stub_url() -> Iterator[str]:
    """A capped stub runtime (capped_stub.py) on a free port."""
    from tests.support.stub_procs import free_port, stop, wait_http

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.capped_stub", "--port", str(port)], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc)
    yield url
    stop(proc)
