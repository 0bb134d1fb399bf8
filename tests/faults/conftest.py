"""Fault tests: real services stopped and restarted under a running gateway.

Each test starts private instances of whatever it breaks (its own Redis, PostgreSQL cluster,
SeaweedFS or runtime process), so stopping one never disturbs the machine's shared services
or the other tests. Fixtures shared by several fault modules live here; each module keeps
the ones only it needs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Reuse the gateway tests' helpers (make_settings, make_peft_adapter, admin, stub_procs)
# rather than copying them: pytest puts only a test file's own folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "gateway"))


@pytest.fixture(scope="session")
def peft_adapter(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gw_helpers import make_peft_adapter

    out = tmp_path_factory.mktemp("adapters") / "fault-adapter"
    return make_peft_adapter(base_model_dir, out, rank=8, alpha=16,
                             target_modules=["q_proj", "v_proj"])
