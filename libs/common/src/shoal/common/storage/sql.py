"""PostgreSQL access for every service: an async engine, sessions, and Alembic migrations.

Each service keeps plain Alembic revision files (``<service>/migrations/0001_init.py`` with
``revision``, ``down_revision``, ``upgrade()``, ``downgrade()``) and no ``env.py``:
:meth:`Database.migrate` drives Alembic itself, under a PostgreSQL advisory lock, and records
the revision in a version table of the service's own, so services own their schema apart.

A service declares its :class:`Schema` and lists it under the ``shoal.migrations`` entry points,
so ``shoal migrate`` finds it. At start-up the service either migrates (``SHOAL_MIGRATE_ON_START``,
``shoal up``) or only checks that the schema is at head (a role without DDL rights, the chart).

Example::

    SCHEMA = Schema("session", Path(__file__).parent / "migrations", "alembic_version_session")
    db = Database("postgresql+asyncpg://postgres@127.0.0.1:15432/shoal")
    await db.prepare_schema(SCHEMA, migrate=settings.migrate_on_start)
    async with db.session() as s, s.begin():
        await s.execute(text("INSERT INTO sessions (id) VALUES (:id)"), {"id": sid})
    await db.close()
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Connection, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext import asyncio as sqlalchemy_asyncio
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import NullPool

from shoal.common.errors import Unavailable

__all__ = [
    "Database",
    "DatabaseClient",
    "Schema",
    "SchemaOutOfDate",
    "SchemaVersion",
    "ensure_database",
    "migrate_database",
]

log = logging.getLogger(__name__)

# A ping that waits longer than this reports the database as down rather than hanging a probe.
_PING_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Schema:
    """One service's schema: its Alembic revisions and the version table it records them in."""

    service: str
    migrations_dir: Path
    version_table: str

    def heads(self) -> tuple[str, ...]:
        """The newest revisions in ``migrations_dir``: what the code needs."""
        return tuple(sorted(_script(self.migrations_dir).get_heads()))


@dataclass(frozen=True)
class SchemaVersion:
    """Where a database's schema is (``current``) against what the code needs (``head``)."""

    service: str
    current: tuple[str, ...]
    head: tuple[str, ...]

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    def as_dict(self) -> dict[str, object]:
        return {
            "current": list(self.current),
            "head": list(self.head),
            "up_to_date": self.up_to_date,
        }


class SchemaOutOfDate(Unavailable):
    """The database's schema is not the one this code needs and the service may not migrate."""

    code = "schema_out_of_date"


class DatabaseClient(Protocol):
    """What a service's store needs from PostgreSQL; :class:`Database` is the real one."""

    def session(self) -> AsyncSession: ...

    async def migrate(self, migrations_dir: Path, version_table: str) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def _async_url(url: str | URL) -> URL:
    """``url`` with the asyncpg driver (``postgresql://`` and ``postgres://`` are accepted too)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    if parsed.drivername != "postgresql+asyncpg":
        raise ValueError(f"expected a postgresql+asyncpg:// URL, got {parsed.drivername}://")
    return parsed


class Database:
    """An async SQLAlchemy engine over asyncpg with a session factory. Connects lazily."""

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        # Through the module: OpenTelemetry's SQLAlchemy instrumentation wraps the module's
        # create_async_engine when tracing starts, after this module was imported.
        self.engine: AsyncEngine = sqlalchemy_asyncio.create_async_engine(
            _async_url(url),
            pool_size=pool_size,
            # A replica outlives PostgreSQL restarts and failovers: check a pooled connection
            # before handing it out instead of failing the first query after one.
            pool_pre_ping=True,
        )
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> AsyncSession:
        """A new session; use as ``async with db.session() as s, s.begin(): ...``."""
        return self._sessions()

    async def migrate(self, migrations_dir: Path, version_table: str) -> None:
        """Upgrade the schema to the newest revision in ``migrations_dir`` (a no-op if there)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(_upgrade_to_head, Path(migrations_dir), version_table)

    async def schema_version(self, schema: Schema) -> SchemaVersion:
        """The schema's current revision here and the head the code needs (reads only: a role
        without DDL rights can ask, given SELECT on the version table)."""
        async with self.engine.connect() as conn:
            current = await conn.run_sync(_current_heads, schema.version_table)
        return SchemaVersion(schema.service, tuple(sorted(current)), schema.heads())

    async def prepare_schema(self, schema: Schema, *, migrate: bool) -> SchemaVersion:
        """Migrate to head (``migrate``), or check that the schema is at head and raise
        :class:`SchemaOutOfDate`, naming the command to run, when it is not."""
        if migrate:
            await self.migrate(schema.migrations_dir, schema.version_table)
        version = await self.schema_version(schema)
        if not version.up_to_date:
            raise SchemaOutOfDate(
                f"the {schema.service} schema is at {','.join(version.current) or 'nothing'}, "
                f"this code needs {','.join(version.head)}: run `shoal migrate --service "
                f"{schema.service}` (the chart's migrations Job) with a role that may change the "
                "schema, or set SHOAL_MIGRATE_ON_START=true"
            )
        return version

    async def ping(self) -> bool:
        """Whether ``SELECT 1`` succeeds now; never raises."""
        try:
            async with asyncio.timeout(_PING_TIMEOUT_S), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:  # a health probe reports any failure as "down"
            log.debug("database ping failed", exc_info=True)
            return False
        return True

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


def _lock_key(version_table: str) -> int:
    """A stable signed 64-bit advisory-lock key for one service's migrations.

    Python's ``hash()`` is salted per process, so replicas would not agree on it.
    """
    digest = hashlib.sha256(f"shoal.migrate:{version_table}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _script(migrations_dir: Path) -> ScriptDirectory:
    if not migrations_dir.is_dir():
        raise FileNotFoundError(f"migrations directory {migrations_dir} does not exist")
    return ScriptDirectory(str(migrations_dir), version_locations=[str(migrations_dir)])


def _current_heads(connection: Connection, version_table: str) -> tuple[str, ...]:
    context = MigrationContext.configure(connection, opts={"version_table": version_table})
    return tuple(context.get_current_heads())


def _upgrade_to_head(connection: Connection, migrations_dir: Path, version_table: str) -> None:
    """Run inside ``AsyncConnection.run_sync`` within one transaction (PostgreSQL DDL is
    transactional, so a failed revision leaves neither schema nor version row behind)."""
    script = _script(migrations_dir)
    # Held until the transaction ends: a replica starting at the same moment waits here, then
    # reads the version this one committed and finds nothing to do.
    lock = text("SELECT pg_advisory_xact_lock(:key)")
    connection.execute(lock, {"key": _lock_key(version_table)})

    def upgrade(revision: Any, context: MigrationContext) -> Any:
        return script._upgrade_revs("head", revision)

    context = MigrationContext.configure(
        connection,
        opts={"version_table": version_table, "fn": upgrade, "script": script},
    )
    before = context.get_current_heads()
    with Operations.context(context):
        context.run_migrations()
    after = context.get_current_heads()
    if before != after:
        log.info(
            "migrated %s from %s to %s", version_table, ",".join(before) or "empty", ",".join(after)
        )


async def _database_exists(conn: AsyncConnection, name: str) -> bool:
    query = text("SELECT 1 FROM pg_database WHERE datname = :name")
    return await conn.scalar(query, {"name": name}) is not None


async def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` if the server lacks it; True if it was created.

    Connects to the server's ``postgres`` database with the URL's credentials.
    """
    parsed = _async_url(url)
    name = parsed.database
    if not name:
        raise ValueError("the database URL names no database")
    # CREATE DATABASE cannot run inside a transaction, hence AUTOCOMMIT.
    admin = create_async_engine(
        parsed.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    try:
        async with admin.connect() as conn:
            if await _database_exists(conn, name):
                return False
            # CREATE DATABASE takes no bind parameters; quote the identifier instead.
            quoted = admin.dialect.identifier_preparer.quote_identifier(name)
            try:
                await conn.execute(text(f"CREATE DATABASE {quoted}"))
            except DBAPIError:
                # A concurrent create fails with duplicate_database, or with a unique violation
                # on pg_database when both passed the check at once: either way it is there.
                if await _database_exists(conn, name):
                    return False
                raise
        log.info("created database %s", name)
        return True
    finally:
        await admin.dispose()


async def migrate_database(
    url: str, migrations_dir: Path, version_table: str, *, create: bool = False
) -> None:
    """Migrate one service's schema to head and disconnect.

    With ``create``, first create the database if the server lacks it (``shoal up``).
    """
    if create:
        await ensure_database(url)
    db = Database(url, pool_size=1)
    try:
        await db.migrate(migrations_dir, version_table)
    finally:
        await db.close()


async def schema_versions(url: str, schemas: list[Schema], *, migrate: bool) -> list[SchemaVersion]:
    """Each schema's version after migrating it (``migrate``) or as it is: ``shoal migrate``."""
    db = Database(url, pool_size=1)
    try:
        versions = []
        for schema in schemas:
            if migrate:
                await db.migrate(schema.migrations_dir, schema.version_table)
            versions.append(await db.schema_version(schema))
        return versions
    finally:
        await db.close()
