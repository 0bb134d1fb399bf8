"""Fault: `loragate serve` killed with SIGKILL. Its runtime child must not live on as an
orphan holding the port, the memory and the device; it notices its parent is gone, drains
and exits by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.fault_procs import ROOT, clean_env, free_port, wait_until
from tests.support.gw_helpers import ADMIN_TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may hold spaces, so split
        # after its closing parenthesis.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie no one has reaped yet (our container's init may
    not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_runtime_child_exits_when_its_gateway_is_killed(tmp_path: Path,
                                                        base_model_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "serve.log").open("wb") as log:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port),
             "--data-dir", str(tmp_path / "data"), "--base-model", str(base_model_dir)],
            cwd=ROOT, env=clean_env(LORAGATE_ADMIN_TOKEN=ADMIN_TOKEN), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    child = None
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, "serve and its runtime ready", timeout_s=180)
        runtimes = children_of(gateway.pid)
        assert len(runtimes) == 1, runtimes
        child = runtimes[0]

        gateway.send_signal(signal.SIGKILL)
        gateway.wait(timeout=30)
        assert not gone(child)  # SIGKILL reached only the gateway: the child must act itself

        wait_until(lambda: gone(child), "the orphaned runtime to exit", timeout_s=60)
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait(timeout=30)
        if child is not None and not gone(child):
            os.kill(child, signal.SIGKILL)  # the test failed already; don't leak the process
