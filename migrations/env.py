"""Alembic environment: async engines (aiosqlite, asyncpg), models from adapters.models.

The URL comes from the Alembic config (`adapters.db` sets it; `alembic.ini` has the
embedded default). SQLite runs in batch mode so later ALTERs work there too.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection

from adapters.db import create_engine, is_sqlite
from adapters.models import Base

target_metadata = Base.metadata


def _configure(**kwargs) -> None:
    url = context.config.get_main_option("sqlalchemy.url") or ""
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=is_sqlite(url),
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=context.config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


# Any constant shared by every replica: two gateways starting at once must not both migrate.
_PG_MIGRATION_LOCK = 0x6C6F7261  # "lora"


def _run_sync(connection: Connection) -> None:
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        # A session-level lock, taken and committed on its own, so the migration below runs
        # and commits in its own transaction before the lock is released: the next replica
        # then sees the new revision instead of migrating again.
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        connection.commit()
    try:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    finally:
        if postgres:
            connection.rollback()  # leave a failed migration's transaction before unlocking
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_MIGRATION_LOCK})
            connection.commit()


async def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url") or ""
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_sync)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
