"""Fault tests: real services stopped and restarted under a running gateway.

Each test starts private instances of whatever it breaks (its own Redis, PostgreSQL cluster,
SeaweedFS or runtime process), so stopping one never disturbs the machine's shared services
or the other tests. Fixtures shared by several fault modules live here; each module keeps
the ones only it needs.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def peft_adapter(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.gw_helpers import make_peft_adapter

    out = tmp_path_factory.mktemp("adapters") / "fault-adapter"
    return make_peft_adapter(base_model_dir, out, rank=8, alpha=16,
                             target_modules=["q_proj", "v_proj"])
