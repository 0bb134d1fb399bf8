"""Catalog fixtures: a migrated database (SQLite per test, or the session's PostgreSQL
database emptied per test), a LocalStore under tmp_path, and the Catalog over both."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from adapters.catalog import Catalog
from adapters.db import create_engine, create_sessionmaker, upgrade_database
from adapters.models import Base
from adapters.storage import LocalStore
from tests.support.adapter_files import SPEC, count_rows, stored_objects

MAX_RANK = 16
_migrated: set[str] = set()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"
    upgrade_database(url)
    return url


@pytest.fixture
def empty_postgres_url(postgres_url: str) -> Iterator[str]:
    """The session database at head with every table emptied, before the test and after it.

    Emptied after too: some tests insert rows with explicit ids, which leaves the identity
    sequences behind them, and later tests of the session share this database.
    """
    upgrade_database(postgres_url)  # cheap when already at head; a migration test may move it

    async def truncate() -> None:
        engine = create_engine(postgres_url)
        try:
            async with engine.begin() as conn:
                tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
                await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        finally:
            await engine.dispose()

    asyncio.run(truncate())  # sync fixture: no loop runs here
    yield postgres_url
    upgrade_database(postgres_url)
    asyncio.run(truncate())


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.unit),
        pytest.param("postgres", marks=pytest.mark.integration),
    ]
)
def any_db_url(request: pytest.FixtureRequest) -> str:
    """A migrated, empty catalog database: SQLite, then PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "empty_postgres_url"
    return request.getfixturevalue(name)


def _catalog(url: str, root: Path) -> tuple[Catalog, LocalStore, object]:
    engine = create_engine(url)
    store = LocalStore(root / "artifacts")
    return Catalog(create_sessionmaker(engine), store, SPEC, max_rank=MAX_RANK), store, engine


@pytest.fixture
async def catalog(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Catalog]:
    cat, _, engine = _catalog(sqlite_url, tmp_path)
    yield cat
    await engine.dispose()


@pytest.fixture
async def any_catalog(any_db_url: str, tmp_path: Path) -> AsyncIterator[Catalog]:
    """The same Catalog over SQLite and over PostgreSQL."""
    cat, _, engine = _catalog(any_db_url, tmp_path)
    yield cat
    await engine.dispose()


@pytest.fixture
def nothing_left(catalog: Catalog):
    """Asserts that a refused upload left no catalog row and no stored object."""

    async def check() -> None:
        assert await count_rows(catalog) == (0, 0)
        assert stored_objects(catalog.store) == []  # type: ignore[arg-type]

    return check


@pytest.fixture
async def catalog_pair(any_db_url: str, tmp_path: Path) -> AsyncIterator[tuple[Catalog, Catalog]]:
    """Two catalogs, each with its own engine (two gateway replicas), over one database
    and one artifact store."""
    first, _, engine_a = _catalog(any_db_url, tmp_path)
    second, _, engine_b = _catalog(any_db_url, tmp_path)
    yield first, second
    await engine_a.dispose()
    await engine_b.dispose()


@pytest.fixture
async def postgres_catalog(empty_postgres_url: str, tmp_path: Path) -> AsyncIterator[Catalog]:
    """A Catalog over PostgreSQL only, for races that need row locks to show."""
    cat, _, engine = _catalog(empty_postgres_url, tmp_path)
    yield cat
    await engine.dispose()
