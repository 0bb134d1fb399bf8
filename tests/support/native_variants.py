"""Re-running a test file's native-op tests under a lesser CPU variant of the build.

Each C++ library builds one code path per CPU kind (kernels.native.variant); a machine runs
only its own unless told otherwise. `rerun_under_variant` runs the selected tests of a file
again in a process where torch reports a lesser CPU (ATEN_CPU_CAPABILITY), which builds and
loads that variant.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The variants a CPU of each kind can also run, besides its own.
LOWER_VARIANTS = {"AVX512": ("avx2", "default"), "AVX2": ("default",)}
ROOT = Path(__file__).resolve().parents[2]


def rerun_under_variant(test_file: str, capability: str, select: str) -> None:
    """pytest `test_file -k select` with torch reporting `capability`; skips where this CPU
    cannot run that variant, or it is this CPU's own."""
    if capability not in LOWER_VARIANTS.get(torch.backends.cpu.get_cpu_capability(), ()):
        pytest.skip(f"this CPU cannot run the {capability} variant or it is the native one")
    env = os.environ | {"ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k",
         select],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout


# For a test that re-runs its own file: never inside such a re-run.
not_in_a_rerun = pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") is not None,
                                    reason="already running one variant")
