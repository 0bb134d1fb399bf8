"""Real processes for the fault tests: runtimes and gateways, each in its own process group.

Each process gets its own session (process group), so a test can SIGKILL one runtime without
touching anything else, and cleanup kills the whole group even if the process forked.
Everything waits by polling a condition under a generous deadline: the machine running the
tests may be loaded, and nothing here asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.support.gw_helpers import ADMIN_TOKEN, adapter_files, admin

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0  # a runtime loads torch and its model; slow on a busy 2-core box
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], T], what: str, timeout_s: float = 60.0,
               interval_s: float = 0.1) -> T:
    """Poll `condition` until it returns something truthy; that value. AssertionError naming
    `what` after the deadline. A deadline on a condition, never a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)


@dataclass
class Proc:
    """A started process, where it listens and where its output goes."""

    popen: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it: a crash, not a shutdown."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL it if it lingers; safe to call twice."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the group (the leader may be gone already).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.wait(timeout=15)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any LORAGATE_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env | extra


def _spawn(args: list[str], log_path: Path, env: dict[str, str], url: str) -> Proc:
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Proc(popen, url, log_path)


def _wait_ok(proc: Proc, path: str) -> None:
    def answered() -> bool:
        assert proc.alive(), f"{proc.url} exited ({proc.popen.returncode}): {proc.log_tail()}"
        try:
            return httpx.get(f"{proc.url}{path}", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(answered, f"{proc.url}{path}", timeout_s=START_TIMEOUT_S, interval_s=0.2)
    except BaseException:
        proc.stop()
        raise


def start_runtimes(base_model_dir: Path, log_paths: list[Path],
                   artifacts_dir: Path | None = None, **env: str) -> list[Proc]:
    """`loragate runtime` processes over `base_model_dir` on CPU, one per log path, loading
    side by side; returns once each /health answers 200 (all stopped if one never does).

    `artifacts_dir`: the gateway's local store (DATA_DIR/artifacts), the only folder a
    runtime opens artifacts from; S3 stores come through `env`."""
    procs = []
    store = ["--artifacts-dir", str(artifacts_dir.resolve())] if artifacts_dir else []
    for log_path in log_paths:
        port = free_port()
        procs.append(_spawn(["runtime", "--base-model", str(base_model_dir), "--port",
                             str(port), "--device", "cpu", "--max-gpu-adapters", "4", *store],
                            log_path, clean_env(**env), f"http://127.0.0.1:{port}"))
    try:
        for proc in procs:
            _wait_ok(proc, "/health")
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs


def start_gateway(data_dir: Path, base_model_dir: Path, runtimes: list[str], log_path: Path,
                  **env: str) -> Proc:
    """`loragate serve --runtimes ...`; returns once /healthz answers 200."""
    port = free_port()
    proc = _spawn(["serve", "--port", str(port), "--data-dir", str(data_dir),
                   "--base-model", str(base_model_dir), "--runtimes", ",".join(runtimes)],
                  log_path, clean_env(LORAGATE_ADMIN_TOKEN=ADMIN_TOKEN, **env),
                  f"http://127.0.0.1:{port}")
    _wait_ok(proc, "/healthz")
    return proc


def s3_env(server: Any, prefix: str) -> dict[str, str]:
    """The variables that point a gateway and a runtime at an S3Server (tests/conftest.py,
    not importable by name: every test folder has a module called conftest)."""
    return {
        "LORAGATE_S3_ENDPOINT_URL": server.endpoint_url,
        "LORAGATE_S3_BUCKET": server.bucket,
        "LORAGATE_S3_PREFIX": prefix,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": server.region,
    }


def new_tenant(gateway: str) -> tuple[str, str]:
    """A fresh tenant and one key's plaintext."""
    name = f"fault-{secrets.token_hex(4)}"
    created = httpx.post(f"{gateway}/admin/tenants", json={"name": name}, headers=admin())
    assert created.status_code == 201, created.text
    key = httpx.post(f"{gateway}/admin/tenants/{name}/keys", json={"name": "ci"},
                     headers=admin())
    assert key.status_code == 201, key.text
    return name, str(key.json()["key"])


def upload(gateway: str, tenant: str, adapter: str, directory: Path) -> httpx.Response:
    return httpx.post(f"{gateway}/admin/tenants/{tenant}/adapters/{adapter}/versions",
                      files=adapter_files(directory), headers=admin(), timeout=60)


def listed_adapters(gateway: str, tenant: str) -> dict[str, list[int]]:
    """The admin API's view: adapter name -> its version numbers."""
    response = httpx.get(f"{gateway}/admin/tenants/{tenant}/adapters", headers=admin())
    assert response.status_code == 200, response.text
    return {a["name"]: [v["version"] for v in a["versions"]] for a in response.json()}


def catalog_rows(catalog_db: Path, tenant: str) -> list[tuple[str, int | None]]:
    """(adapter, version number) of the tenant's adapters, read straight from the SQLite
    catalog, bypassing the gateway and its caches; an adapter row without versions shows as
    (name, None)."""
    with contextlib.closing(sqlite3.connect(f"file:{catalog_db}?mode=ro", uri=True)) as db:
        return db.execute(
            "SELECT a.name, v.number FROM adapters a JOIN tenants t ON t.id = a.tenant_id"
            " LEFT JOIN adapter_versions v ON v.adapter_id = a.id"
            " WHERE t.name = ? ORDER BY a.name, v.number", (tenant,)).fetchall()
