"""`loragate serve` as a real subprocess and `loragate admin` against it, end to end."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.support.gw_helpers import read_adapter_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any LORAGATE_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env | extra


def loragate(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


def read_until(stream: IO[str], marker: str, proc: subprocess.Popen[str]) -> list[str]:
    """Lines of stdout up to and including the first that contains `marker`."""
    lines: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            pytest.fail(f"serve exited ({proc.poll()}) before printing {marker!r}: {lines}")
        lines.append(line.rstrip("\n"))
        if marker in line:
            return lines
    pytest.fail(f"serve did not print {marker!r} in time: {lines}")


@contextmanager
def running_serve(data_dir: Path, port: int, log: Path, *extra: str) -> Iterator[tuple[
        subprocess.Popen[str], list[str]]]:
    with log.open("a") as log_file:
        proc = subprocess.Popen(
            loragate("serve", "--data-dir", str(data_dir), "--port", str(port), *extra),
            stdout=subprocess.PIPE, stderr=log_file, text=True, env=clean_env(), cwd=ROOT,
        )
    try:
        assert proc.stdout is not None
        yield proc, read_until(proc.stdout, "listening on", proc)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def admin_cli(url: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        loragate("admin", "--url", url, *args), capture_output=True, text=True,
        env=clean_env(LORAGATE_ADMIN_TOKEN=token), cwd=ROOT, timeout=120,
    )


def test_serve_and_admin_upload_end_to_end(tmp_path: Path, peft_adapter: Path) -> None:
    data_dir, port, log = tmp_path / "data", free_port(), tmp_path / "serve.log"
    dead_runtime = f"http://127.0.0.1:{free_port()}"
    url = f"http://127.0.0.1:{port}"
    with running_serve(data_dir, port, log, "--runtimes", dead_runtime) as (_, lines):
        assert lines[-1] == f"loragate listening on {url}"
        token_lines = [line for line in lines if line.startswith("admin token")]
        assert len(token_lines) == 1
        token = token_lines[0].rsplit(" ", 1)[1]

        assert httpx.get(f"{url}/healthz").status_code == 200
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["runtimes"][0]["url"] == dead_runtime
        assert ready.json()["missing"] == ["no runtime has its base model loaded"]

        created = admin_cli(url, token, "tenant-create", "acme", "--rpm", "60")
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["requests_per_minute"] == 60
        key = json.loads(admin_cli(url, token, "key-create", "acme", "--name", "ci").stdout)
        assert key["key"].startswith("lg_")

        uploaded = admin_cli(url, token, "upload", "acme", "support", str(peft_adapter),
                             "--activate")
        assert uploaded.returncode == 0, uploaded.stderr
        model_bytes = (peft_adapter / "adapter_model.safetensors").read_bytes()
        version = json.loads(uploaded.stdout)
        assert version["sha256"] == hashlib.sha256(model_bytes).hexdigest()
        assert version["size_bytes"] == len(model_bytes)
        assert version["rank"] == read_adapter_config(peft_adapter)["r"]
        assert version["active"] is True

        listed = json.loads(admin_cli(url, token, "list", "acme").stdout)
        assert listed[0]["name"] == "support" and listed[0]["active_version"] == 1
        activated = admin_cli(url, token, "activate", "acme", "support", "1")
        assert activated.returncode == 0 and json.loads(activated.stdout)["active_version"] == 1

        missing = admin_cli(url, token, "key-create", "ghost")
        assert missing.returncode == 1 and "HTTP 404" in missing.stderr
        refused = admin_cli(url, "wrong-token", "tenant-list")
        assert refused.returncode == 1 and "HTTP 401" in refused.stderr
        no_dir = admin_cli(url, token, "upload", "acme", "x", str(tmp_path / "nowhere"))
        assert no_dir.returncode == 1 and "adapter_config.json" in no_dir.stderr

    hash_file = data_dir / "admin_token.sha256"
    assert hash_file.stat().st_mode & 0o777 == 0o600
    assert hash_file.read_text().strip() == hashlib.sha256(token.encode()).hexdigest()
    assert (data_dir / "catalog.db").is_file()
    assert (data_dir / "models" / "builtin" / "config.json").is_file()

    # Second start: the same token still works and is not printed again.
    with running_serve(data_dir, port, log, "--runtimes", dead_runtime) as (_, lines):
        assert not any(token in line or "admin token" in line for line in lines)
        assert admin_cli(url, token, "tenant-list").returncode == 0

    logged = log.read_text()
    assert token not in logged and key["key"] not in logged


def port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, int(port))) == 0


def test_serve_without_runtimes_starts_one_and_stops_it_on_sigterm(
    tmp_path: Path, peft_adapter: Path
) -> None:
    data_dir, port, log = tmp_path / "data", free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("a") as log_file:
        proc = subprocess.Popen(
            loragate("serve", "--data-dir", str(data_dir), "--port", str(port),
                     "--device", "cpu"),
            stdout=subprocess.PIPE, stderr=log_file, text=True, env=clean_env(), cwd=ROOT,
        )
    try:
        assert proc.stdout is not None
        lines = read_until(proc.stdout, "listening on", proc)
        token = next(line for line in lines if line.startswith("admin token")).rsplit(" ", 1)[1]
        deadline = time.monotonic() + START_TIMEOUT_S
        ready = httpx.get(f"{url}/readyz")
        while ready.status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)  # polling readiness until the deadline, not a timing assertion
            ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200, log.read_text()[-3000:]
        runtime_url = ready.json()["runtimes"][0]["url"]
        assert port_open(runtime_url)

        # The one command gives a working system: upload an adapter, then complete with it.
        assert admin_cli(url, token, "tenant-create", "acme").returncode == 0
        key = json.loads(admin_cli(url, token, "key-create", "acme").stdout)["key"]
        uploaded = admin_cli(url, token, "upload", "acme", "support", str(peft_adapter))
        assert uploaded.returncode == 0, uploaded.stderr
        completion = httpx.post(
            f"{url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
            json={"model": "support", "prompt": "hello", "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        assert completion.status_code == 200, completion.text
        assert completion.headers["X-Loragate-Adapter"] == "support@1"
        assert completion.json()["usage"]["completion_tokens"] >= 1

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert not port_open(runtime_url), "the runtime child outlived serve"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def runtime_child_pid(data_dir: Path) -> int:
    """The pid of the runtime that serve started for this test's own data dir."""
    marker = str(data_dir / "models" / "builtin")
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            argv = (proc_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"runtime" in argv and marker.encode() in argv:
            return int(proc_dir.name)
    pytest.fail("runtime child not found")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the child")
def test_gateway_outlives_its_runtime_child_and_reports_it(tmp_path: Path) -> None:
    data_dir, port, log = tmp_path / "data", free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with running_serve(data_dir, port, log, "--device", "cpu") as (proc, _):
        deadline = time.monotonic() + START_TIMEOUT_S
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)  # polling readiness until the deadline, not a timing assertion
        os.kill(runtime_child_pid(data_dir), signal.SIGKILL)
        ready = httpx.get(f"{url}/readyz")
        while ready.status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["missing"] == ["no runtime has its base model loaded"]
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert proc.poll() is None
        # The router's probe may see the runtime gone before serve's child watcher polls;
        # wait for the watcher's line while serve still runs (stopping it cancels the watcher).
        while "runtime child exited" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    assert "runtime child exited" in log.read_text()
