"""Processes for the inference tests: stub runtimes and live gateways on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def start_stub(token_delay_ms: float = 0.0) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.stub_runtime", "--port", str(port),
         "--token-delay-ms", str(token_delay_ms)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc)
    return proc, url


def start_gateway(data_dir: Path, base_model_dir: Path, runtimes: list[str], admin_token: str,
                  **env: str) -> tuple[subprocess.Popen[bytes], str]:
    """`loragate serve --runtimes ...` as a subprocess."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_")}
    environ.update({"LORAGATE_ADMIN_TOKEN": admin_token, **env})
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port),
         "--data-dir", str(data_dir), "--base-model", str(base_model_dir),
         "--runtimes", ",".join(runtimes)], cwd=ROOT, env=environ)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc)
    return proc, url


def start_whole_stack(data_dir: Path, admin_token: str) -> tuple[subprocess.Popen[bytes], str]:
    """`loragate serve` with no --runtimes: the gateway and its own runtime on the built-in
    model, one command, as the README's quickstart runs it; returned once /readyz is 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_")}
    env["LORAGATE_ADMIN_TOKEN"] = admin_token
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port),
         "--data-dir", str(data_dir), "--device", "cpu"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc, timeout_s=120)
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/readyz", timeout=2).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway never became ready")
            time.sleep(0.2)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
