"""`loragate serve`: one command gives a working system.

Prepares the data dir (SQLite catalog migrated, built-in model generated, admin token made
on first start), starts one runtime as a child process when no `--runtimes` are given, and
runs the gateway with uvicorn until interrupted. The child is stopped when the gateway
exits; if the child dies first, the gateway keeps running and `/readyz` answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.auth import ensure_admin_token
from gateway.services import Part
from gateway.settings import Settings

logger = logging.getLogger("loragate.serve")

CHILD_STOP_TIMEOUT_S = 10.0
CHILD_WATCH_INTERVAL_S = 1.0


def prepare_data_dir(settings: Settings) -> str | None:
    """Create the data dir, migrate an embedded SQLite catalog, generate the built-in model.

    Returns a newly generated admin token (first start only), else None.
    """
    from adapters.db import current_revision, head_revision, is_sqlite, upgrade_database

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if is_sqlite(settings.database_url):
        upgrade_database(settings.database_url)  # embedded mode owns its database
    else:
        # A shared database is migrated once, on purpose, by `loragate migrate`.
        current, head = current_revision(settings.database_url), head_revision()
        if current != head:
            raise SystemExit(
                f"catalog schema is at {current or 'no revision'}, this version needs {head}: "
                "run `loragate migrate upgrade` first"
            )
    if settings.base_model_dir is None:
        from runtime.model.builtin import ensure_builtin_model

        ensure_builtin_model(settings.builtin_model_dir)
    elif not (settings.base_model_dir / "config.json").is_file():
        raise SystemExit(f"--base-model {settings.base_model_dir}: no config.json there")
    return ensure_admin_token(settings)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_runtime_child(
    settings: Settings, token: str
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the runtime child on a free loopback port, requiring `token` of its callers."""
    port = free_port()
    command = [
        sys.executable, "-m", "gateway.cli", "runtime",
        "--base-model", str(settings.base_model_path.resolve()),
        "--host", "127.0.0.1", "--port", str(port),
        "--parent-pid", str(os.getpid()),  # the child exits even if we are SIGKILLed
        # The store this gateway writes: the only place the child may open artifacts from.
        "--artifacts-dir", str(settings.artifacts_dir.resolve()),
    ]  # fmt: skip
    if settings.device:
        command += ["--device", settings.device]
    # The token and the S3 store go by environment: argv is visible to anyone in `ps`.
    env = {**os.environ, "LORAGATE_RUNTIME_TOKEN": token}
    for name, value in (("S3_BUCKET", settings.s3_bucket), ("S3_PREFIX", settings.s3_prefix),
                        ("S3_ENDPOINT_URL", settings.s3_endpoint_url)):
        env.pop(f"LORAGATE_{name}", None)
        if value:
            env[f"LORAGATE_{name}"] = value
    # Same process group (API.md); stdout/stderr shared so its logs show with ours.
    child = subprocess.Popen(command, env=env)  # noqa: S603 (our own interpreter and fixed arguments)
    return child, f"http://127.0.0.1:{port}"


def stop_child(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=CHILD_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


class _Shutdown(Exception):
    """SIGTERM, turned into an exception so that `finally` blocks (stopping the child) run."""


def _raise_shutdown(signum: int, _frame: Any) -> None:
    raise _Shutdown(signal.Signals(signum).name)


class _Server(uvicorn.Server):
    """uvicorn, printing the URL once the socket is bound (not before, when it may fail)."""

    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"loragate listening on {self.url}", flush=True)


def _child_watcher(child: subprocess.Popen[bytes]) -> Part:
    """A part whose task logs the child's death (serve stays up, /readyz turns 503)."""

    async def watch() -> None:
        # Polling: Popen has no awaitable exit, and a thread blocked in wait() would
        # outlive a cancelled task.
        while child.poll() is None:  # noqa: ASYNC110
            await asyncio.sleep(CHILD_WATCH_INTERVAL_S)
        logger.error("runtime child exited with code %s; /readyz now answers 503", child.returncode)

    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        tasks.append(asyncio.create_task(watch()))

    async def stop() -> None:
        for task in tasks:
            task.cancel()

    return Part("runtime child watcher", start, stop)


def serve(settings: Settings) -> int:
    token = prepare_data_dir(settings)
    if token is not None:
        print(f"admin token (shown once; only its hash is kept): {token}", flush=True)
    child = None
    if not settings.runtimes:
        # A fresh token per start: only this gateway can call the runtime it starts.
        runtime_token = secrets.token_urlsafe(32)
        child, runtime_url = start_runtime_child(settings, runtime_token)
        settings = replace(settings, runtimes=(runtime_url,), runtime_token=runtime_token)
    try:
        watcher = [_child_watcher(child)] if child is not None else []
        app = create_app(settings, extra_parts=watcher)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None)
        server = _Server(config, f"http://{settings.host}:{settings.port}")
        # uvicorn shuts down gracefully, then re-raises the signal under the handler that was
        # installed before it: ours, so SIGTERM ends here instead of killing the process
        # before the child is stopped.
        signal.signal(signal.SIGTERM, _raise_shutdown)
        try:
            server.run()
        except (KeyboardInterrupt, _Shutdown):
            pass
        return 0 if server.started else 1
    finally:
        if child is not None:
            stop_child(child)
