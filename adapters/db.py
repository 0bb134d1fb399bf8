"""Engines, sessions and schema migrations for the catalog (SQLite or PostgreSQL).

`create_engine(url)` returns an AsyncEngine; on SQLite it turns on foreign keys, WAL and a
busy timeout for every connection. Migrations run Alembic programmatically on the
`migrations/` directory next to this package; they work from sync code and from inside a
running event loop (the call then runs on a helper thread and blocks until done).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import asyncpg.exceptions as asyncpg_exc
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000
T = TypeVar("T")


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable enough with WAL
    finally:
        cursor.close()


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An AsyncEngine for `sqlite+aiosqlite:///...` or `postgresql+asyncpg://...`."""
    # Statement parameters include API key prefixes and secret hashes: keep them out of
    # SQLAlchemy's logs and of the messages of the errors it raises.
    kwargs.setdefault("hide_parameters", True)
    if is_sqlite(url):
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = _create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return _create_async_engine(url, **kwargs)


# A lost or refused database connection surfaces as any of these, depending on where it
# breaks: asyncpg's connect raises OSError subclasses and its own errors unwrapped (SQLAlchemy
# wraps only errors of an open DBAPI connection), a query on a connection the server cut is
# a DBAPIError flagged `connection_invalidated`, and the pool has its own timeout.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    ConnectionError,  # refused, reset
    TimeoutError,  # asyncpg's connect timeout
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # no pooled connection within pool_timeout
)
_ASYNCPG_UNREACHABLE: tuple[type[BaseException], ...] = (
    asyncpg_exc.PostgresConnectionError,  # connection does not exist, connection failure
    asyncpg_exc.OperatorInterventionError,  # starting up, shutting down, crash shutdown
    asyncpg_exc.InsufficientResourcesError,  # too many connections
)


def is_unreachable(exc: BaseException) -> bool:
    """True when `exc` means "the catalog's database cannot be reached now", not a bug."""
    if isinstance(exc, _UNREACHABLE + _ASYNCPG_UNREACHABLE):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: views are built from rows after their transaction commits.
    return async_sessionmaker(engine, expire_on_commit=False)


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would eat a '%' in a password.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


# Alembic keeps its migration context in module globals: one command per process at a time.
# Across processes (replicas) migrations/env.py takes a PostgreSQL advisory lock.
_ALEMBIC_LOCK = threading.Lock()


def _off_the_loop(fn: Callable[[], T]) -> T:
    """Run fn here, or on a helper thread when this thread already runs an event loop
    (Alembic's env starts its own loop for the async driver)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


def run_migrations(
    url: str, direction: Literal["upgrade", "downgrade"] = "upgrade", revision: str = "head"
) -> None:
    """`alembic upgrade|downgrade <revision>` on the database at url."""
    from alembic import command

    if direction not in ("upgrade", "downgrade"):
        raise ValueError("direction must be 'upgrade' or 'downgrade'")
    config = _alembic_config(url)
    step = command.upgrade if direction == "upgrade" else command.downgrade

    def locked() -> None:
        with _ALEMBIC_LOCK:
            step(config, revision)

    _off_the_loop(locked)


def upgrade_database(url: str) -> None:
    """Bring the schema to the newest revision (embedded serve, `loragate migrate`)."""
    if is_sqlite(url):
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    run_migrations(url, "upgrade", "head")


def current_revision(url: str) -> str | None:
    """The revision the database is at, or None when it was never migrated."""

    async def read() -> str | None:
        from alembic.runtime.migration import MigrationContext

        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda sync: MigrationContext.configure(sync).get_current_revision()
                )
        finally:
            await engine.dispose()

    return _off_the_loop(lambda: asyncio.run(read()))


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()


def upgrade(url: str, revision: str = "head") -> None:
    """`loragate migrate upgrade [REV]`: same as run_migrations(url, "upgrade", revision)."""
    if revision == "head":
        upgrade_database(url)
    else:
        run_migrations(url, "upgrade", revision)


def downgrade(url: str, revision: str) -> None:
    """`loragate migrate downgrade REV` (e.g. "base" or "-1")."""
    run_migrations(url, "downgrade", revision)


def current(url: str) -> str | None:
    """`loragate migrate current`: alias of current_revision."""
    return current_revision(url)
