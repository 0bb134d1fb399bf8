"""Kernel test fixtures.

Kernels are dispatched by TRITON_INTERPRET at call time, so the `backend` fixture only sets
or clears that variable around each test; nothing here depends on import order, and the
rest of the suite is unaffected.
"""

from __future__ import annotations

import pytest


@pytest.fixture(params=["torch", "interpret"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test on the torch path and on the Triton kernels under the interpreter."""
    if request.param == "interpret":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param
