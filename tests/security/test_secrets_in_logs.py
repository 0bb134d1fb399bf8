"""No key or token ever reaches a log line or an error body.

Secret here (API.md, "Authentication": only hashes are stored): the admin token and its
sha256, every plaintext tenant key, its secret part and the secret's stored sha256, and the
wrong keys and tokens callers tried. API.md does not call key prefixes public, so they must
not be logged either. Checked twice: the app in process with every logger captured at DEBUG,
and a real `loragate serve` at LORAGATE_LOG_LEVEL=DEBUG (uvicorn's access log included)
with its stdout and stderr read back. The one answer allowed to carry a key is the 201 that
creates it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from adapters.db import upgrade_database
from gateway.app import create_app
from tests.support.gw_helpers import adapter_files, make_settings
from tests.support.sec_helpers import adapter_dir

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Exercise:
    admin_token: str
    secrets: set[str] = field(default_factory=set)
    bodies: list[tuple[str, int, str]] = field(default_factory=list)  # where, status, text
    statuses: dict[str, int] = field(default_factory=dict)

    def add_key(self, plaintext: str) -> None:
        _, prefix, secret = plaintext.split("_", 2)
        self.secrets |= {plaintext, secret, prefix, hashlib.sha256(secret.encode()).hexdigest()}

    def add_token(self, token: str) -> None:
        self.secrets |= {token, hashlib.sha256(token.encode()).hexdigest()}

    def leaks_in(self, text: str) -> list[str]:
        return sorted(s for s in self.secrets if s in text)


async def exercise(client: Any, admin_token: str, adapter: Path) -> Exercise:
    """Every kind of key use and misuse; records answers and the secrets involved."""
    ex = Exercise(admin_token)
    ex.add_token(admin_token)
    wrong_admin = f"wrong-admin-{secrets.token_urlsafe(16)}"
    ex.add_token(wrong_admin)

    async def call(where: str, method: str, path: str, token: str | None, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        r = await client.request(method, path, headers=headers, **kw)
        ex.statuses[where] = r.status_code
        ex.bodies.append((where, r.status_code, r.text))
        return r

    admin = admin_token
    await call("tenant", "POST", "/admin/tenants", admin, json={"name": "acme"})
    keys = []
    for name in ("ci", "to-revoke"):
        r = await call(f"key {name}", "POST", "/admin/tenants/acme/keys", admin,
                       json={"name": name})
        ex.bodies.pop()  # the one answer that must show the key, once
        keys.append(r.json())
        ex.add_key(r.json()["key"])
    key, revoked = keys[0]["key"], keys[1]["key"]
    _, prefix, _ = key.split("_", 2)
    wrong_secret = f"lg_{prefix}_{secrets.token_urlsafe(32)}"
    unknown = f"lg_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
    ex.add_key(wrong_secret)
    ex.add_key(unknown)
    await call("upload", "POST", "/admin/tenants/acme/adapters/support/versions", admin,
               files=adapter_files(adapter))
    await call("models", "GET", "/v1/models", key)
    for stream in (False, True):
        await call(f"completion stream={stream}", "POST", "/v1/completions", key,
                   json={"model": "support", "prompt": "hi", "max_tokens": 2, "stream": stream})
    await call("chat", "POST", "/v1/chat/completions", key,
               json={"model": "support", "max_tokens": 2,
                     "messages": [{"role": "user", "content": "hi"}]})
    await call("revoked before", "GET", "/v1/models", revoked)
    await call("revoke", "DELETE", f"/admin/keys/{keys[1]['id']}", admin)
    await call("revoked", "GET", "/v1/models", revoked)
    await call("wrong secret", "GET", "/v1/models", wrong_secret)
    await call("unknown key", "POST", "/v1/completions", unknown,
               json={"model": "support", "prompt": "hi"})
    await call("malformed key", "GET", "/v1/models", f"lg_{prefix}")
    await call("no key", "GET", "/v1/models", None)
    await call("admin on tenant", "POST", "/v1/completions", admin,
               json={"model": "support", "prompt": "hi"})
    await call("key on admin", "GET", "/admin/tenants", key)
    await call("revoked on admin", "GET", "/admin/tenants", revoked)
    await call("wrong admin", "GET", "/admin/tenants", wrong_admin)
    await call("wrong admin upload", "POST", "/admin/tenants/acme/adapters/x/versions",
               wrong_admin, files=adapter_files(adapter))
    await call("bad body", "POST", "/v1/completions", key, content=b"{" + key.encode())
    return ex


def check(ex: Exercise, log_text: str) -> None:
    assert ex.statuses["completion stream=False"] == 200, ex.statuses
    assert ex.statuses["revoked before"] == 200 and ex.statuses["revoked"] == 401
    for where in ("wrong secret", "unknown key", "malformed key", "no key", "admin on tenant",
                  "wrong admin", "wrong admin upload", "revoked on admin"):
        assert ex.statuses[where] == 401, (where, ex.statuses)
    assert ex.statuses["key on admin"] == 403
    assert log_text.strip(), "nothing was logged: the capture is broken"
    leaked = ex.leaks_in(log_text)
    lines = [line for line in log_text.splitlines() if any(s in line for s in leaked)]
    assert not leaked, sorted({line.split(" ", 1)[0] for line in lines}) + lines[:3]
    assert "authorization" not in log_text.lower() or "bearer" not in log_text.lower()
    for where, status, text in ex.bodies:
        assert not ex.leaks_in(text), (where, status, text[:500])


async def test_in_process_debug_logs_and_answers_hold_no_secret(
    tmp_path: Path, base_model_dir: Path, base_spec: Any, stub_url: str,
    caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.cli.main import LOGGER_FLOORS

    caplog.set_level(logging.DEBUG)  # every logger, third-party ones (SQL, HTTP) included
    # The app never configures logging (the CLI does, for `serve`); an embedder applies the
    # same floors, as here. Restored afterwards.
    saved = {name: logging.getLogger(name).level for name in LOGGER_FLOORS}
    for name, level in LOGGER_FLOORS.items():
        logging.getLogger(name).setLevel(level)
    try:
        await _in_process(tmp_path, base_model_dir, base_spec, stub_url, caplog)
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


async def _in_process(tmp_path: Path, base_model_dir: Path, base_spec: Any, stub_url: str,
                      caplog: pytest.LogCaptureFixture) -> None:
    token = f"admin-{secrets.token_urlsafe(24)}"
    settings = make_settings(tmp_path / "data", base_model_dir, runtimes=(stub_url,),
                             admin_token=token)
    upgrade_database(settings.database_url)
    adapter = adapter_dir(tmp_path / "adapter", base_spec, seed=5)
    async with AsyncTestClient(create_app(settings)) as client:
        ex = await exercise(client, token, adapter)
    text = "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    check(ex, text)


@pytest.fixture
def live_gateway(tmp_path: Path, base_model_dir: Path, stub_url: str
                 ) -> Iterator[tuple[str, str, Path]]:
    from tests.support.stub_procs import free_port, stop, wait_http

    token = f"admin-{secrets.token_urlsafe(24)}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_")}
    env.update({"LORAGATE_ADMIN_TOKEN": token, "LORAGATE_LOG_LEVEL": "DEBUG"})
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port),
             "--data-dir", str(tmp_path / "data"), "--base-model", str(base_model_dir),
             "--runtimes", stub_url], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc)
        yield url, token, log_path
    finally:
        stop(proc)


async def test_served_gateway_debug_output_holds_no_secret(
    live_gateway: tuple[str, str, Path], tmp_path: Path, base_spec: Any
) -> None:
    url, token, log_path = live_gateway
    adapter = adapter_dir(tmp_path / "adapter", base_spec, seed=6)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        ex = await exercise(client, token, adapter)
    text = log_path.read_text(errors="replace")
    assert "GET /v1/models" in text, text[-2000:]  # the access log is on and captured
    check(ex, text)
