"""Private Redis and PostgreSQL instances that a fault test may stop and start at will.

The machine's shared services (Redis on 6379, PostgreSQL on 5432) serve every other test, so
the fault tests never touch them: each starts its own instance on a free port and stops it
under a running gateway. A restart keeps the port (and, for PostgreSQL, the data), as a
real outage would. A missing binary skips the test, or fails it under
LORAGATE_REQUIRE_SERVICES=1, as tests/conftest.py does for the shared services.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.fault_procs import Proc, start_gateway
from tests.support.stub_procs import start_stub, stop

START_TIMEOUT_S = 60.0  # a loaded 2-core machine may take a while to bring a server up
PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def unavailable(message: str) -> None:
    """Skip (developer machine) or fail (CI) a test whose service cannot run here."""
    if os.environ.get("LORAGATE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} (LORAGATE_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class PrivateRedis:
    """`redis-server` without persistence on a free port: a restart comes back empty, as a
    Redis without AOF/RDB does after a crash."""

    def __init__(self, log_path: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server not found: the Redis fault test needs its own instance")
        self.binary = str(binary)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._pong():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {self.log_tail()}")
            time.sleep(0.05)  # polling readiness, not timing anything

    def _pong(self) -> bool:
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


class PrivatePostgres:
    """One PostgreSQL cluster of the test's own: `initdb` once, then `stop()` / `start()`.

    PostgreSQL refuses to run as root, so as root every server command runs as the
    `postgres` user, in a directory that user owns (pytest's tmp dirs are root-only).
    """

    def __init__(self) -> None:
        bin_dir = next((d for d in PG_BIN_DIRS if (d / "pg_ctl").exists()), None)
        if bin_dir is None and shutil.which("pg_ctl"):
            bin_dir = Path(str(shutil.which("pg_ctl"))).parent
        if bin_dir is None:
            unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found")
        assert bin_dir is not None  # unavailable() raised otherwise
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="loragate-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self.port = free_port()
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                self.close()
                unavailable("running as root and no `postgres` user to run PostgreSQL as")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout_s: float = START_TIMEOUT_S) -> None:
        done = subprocess.run(
            [*self.as_postgres, *args], capture_output=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): "
                               f"{done.stderr.decode(errors='replace')[-2000:]}")

    def init(self) -> None:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-A", "trust",
                  "-U", "postgres", "--no-sync")

    def start(self) -> None:
        # -w waits until the server accepts connections; the socket lives in our own dir.
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
                   "-c fsync=off -c max_connections=50")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.log_path), "-o", options, "-w", "-t", str(int(START_TIMEOUT_S)),
                  "start")
        assert _accepts(self.port), "pg_ctl start returned but the port does not accept"

    def stop(self) -> None:
        """`pg_ctl stop -m fast`: open connections are cut, as in a real outage."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                  "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def close(self) -> None:
        """Stop the server if it runs and delete the cluster."""
        with contextlib.suppress(Exception):
            if self.running():
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def gateway_on_private_redis(cleanup: ExitStack, tmp_path: Path, base_model_dir: Path,
                             database_url: str, **env: str) -> tuple[Proc, PrivateRedis, Path]:
    """A private Redis, a stub runtime and a gateway process on `database_url` and that
    Redis (extra `env` for the gateway); `cleanup` stops all three. Returns the gateway's
    Proc, the Redis and the gateway's data dir."""
    redis = PrivateRedis(tmp_path / "redis.log")
    redis.start()
    cleanup.callback(redis.stop)
    stub, stub_url = start_stub()
    cleanup.callback(stop, stub)
    data_dir = tmp_path / "data"
    gateway = start_gateway(data_dir, base_model_dir, [stub_url], tmp_path / "gateway.log",
                            LORAGATE_DATABASE_URL=database_url, LORAGATE_REDIS_URL=redis.url,
                            **env)
    cleanup.callback(gateway.stop)
    return gateway, redis, data_dir
