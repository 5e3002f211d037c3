"""Database and migrations against the embedded PostgreSQL (the ``database_url`` fixture)."""

from __future__ import annotations

import asyncio
import secrets
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError

from shoal.common.storage import Database, ensure_database, migrate_database
from shoal.devtools.embedded import EmbeddedPostgres, free_port

_CREATE_ITEMS = '''
    """create items"""
    import sqlalchemy as sa
    from alembic import op

    revision = "0001"
    down_revision = None


    def upgrade() -> None:
        # Slow enough that two unserialised migrations would overlap and one would fail.
        op.execute("SELECT pg_sleep(0.2)")
        op.create_table(
            "items",
            sa.Column("id", sa.Text, primary_key=True),
            sa.Column("name", sa.Text, nullable=False),
        )


    def downgrade() -> None:
        op.drop_table("items")
'''

_ADD_COLOUR = '''
    """add items.colour"""
    import sqlalchemy as sa
    from alembic import op

    revision = "0002"
    down_revision = "0001"


    def upgrade() -> None:
        op.add_column("items", sa.Column("colour", sa.Text, nullable=True))


    def downgrade() -> None:
        op.drop_column("items", "colour")
'''

_BROKEN = '''
    """creates a table, then fails"""
    import sqlalchemy as sa
    from alembic import op

    revision = "0002"
    down_revision = "0001"


    def upgrade() -> None:
        op.create_table("half_done", sa.Column("id", sa.Text, primary_key=True))
        op.execute("SELECT * FROM no_such_table")


    def downgrade() -> None:
        op.drop_table("half_done")
'''


def _write(directory: Path, name: str, source: str) -> None:
    (directory / name).write_text(textwrap.dedent(source))


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    directory = tmp_path / "migrations"
    directory.mkdir()
    # Services ship migrations inside their package; the __init__.py is not a revision.
    (directory / "__init__.py").write_text("")
    _write(directory, "0001_create_items.py", _CREATE_ITEMS)
    return directory


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, pool_size=2)
    yield database
    await database.close()


async def _version(db: Database, table: str) -> list[str]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(text(f"SELECT version_num FROM {table}"))  # noqa: S608
        return [row[0] for row in rows]


async def _columns(db: Database, table: str) -> set[str]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT column_name FROM information_schema.columns WHERE table_name = :t"),
            {"t": table},
        )
        return {row[0] for row in rows}


async def test_migrate_twice_is_a_noop(db: Database, migrations: Path) -> None:
    await db.migrate(migrations, "alembic_version_test")
    assert await _version(db, "alembic_version_test") == ["0001"]

    async with db.session() as s, s.begin():
        await s.execute(text("INSERT INTO items (id, name) VALUES ('a', 'apple')"))

    await db.migrate(migrations, "alembic_version_test")
    assert await _version(db, "alembic_version_test") == ["0001"]
    async with db.session() as s:
        assert (await s.execute(text("SELECT name FROM items"))).scalars().all() == ["apple"]


async def test_concurrent_migrations_are_serialised(database_url: str, migrations: Path) -> None:
    replicas = [Database(database_url, pool_size=1) for _ in range(3)]
    try:
        await asyncio.gather(*(r.migrate(migrations, "alembic_version_test") for r in replicas))
        assert await _version(replicas[0], "alembic_version_test") == ["0001"]
    finally:
        await asyncio.gather(*(r.close() for r in replicas))


async def test_a_revision_added_later_upgrades_an_existing_database(
    db: Database, migrations: Path
) -> None:
    await db.migrate(migrations, "alembic_version_test")
    assert "colour" not in await _columns(db, "items")

    _write(migrations, "0002_add_colour.py", _ADD_COLOUR)
    await db.migrate(migrations, "alembic_version_test")

    assert await _version(db, "alembic_version_test") == ["0002"]
    assert await _columns(db, "items") == {"id", "name", "colour"}


async def test_each_version_table_tracks_its_own_service(db: Database, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    _write(
        other,
        "0001_things.py",
        """
        import sqlalchemy as sa
        from alembic import op

        revision = "a1"
        down_revision = None

        def upgrade() -> None:
            op.create_table("things", sa.Column("id", sa.Text, primary_key=True))

        def downgrade() -> None:
            op.drop_table("things")
        """,
    )
    mine = tmp_path / "mine"
    mine.mkdir()
    _write(mine, "0001_create_items.py", _CREATE_ITEMS)

    await db.migrate(mine, "alembic_version_mine")
    await db.migrate(other, "alembic_version_other")

    assert await _version(db, "alembic_version_mine") == ["0001"]
    assert await _version(db, "alembic_version_other") == ["a1"]


async def test_a_failing_revision_leaves_nothing_behind(db: Database, migrations: Path) -> None:
    await db.migrate(migrations, "alembic_version_test")
    _write(migrations, "0002_broken.py", _BROKEN)

    with pytest.raises(ProgrammingError):
        await db.migrate(migrations, "alembic_version_test")

    assert await _version(db, "alembic_version_test") == ["0001"]
    async with db.engine.connect() as conn:
        exists = await conn.scalar(text("SELECT to_regclass('half_done') IS NOT NULL"))
    assert exists is False


async def test_missing_migrations_directory_is_an_error(db: Database, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await db.migrate(tmp_path / "nope", "alembic_version_test")


async def test_ping(db: Database) -> None:
    assert await db.ping() is True


async def test_ping_is_false_when_nothing_listens() -> None:
    down = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/x")
    try:
        assert await down.ping() is False
    finally:
        await down.close()


async def test_ensure_database_creates_once_and_migrate_database_uses_it(
    postgres: EmbeddedPostgres, migrations: Path
) -> None:
    url = postgres.url("new_" + secrets.token_hex(4))
    assert await ensure_database(url) is True
    assert await ensure_database(url) is False

    # The plain URL form works too, as DATABASE_URL is often written.
    plain = url.replace("postgresql+asyncpg://", "postgresql://")
    await migrate_database(plain, migrations, "alembic_version_cli", create=True)

    db = Database(url)
    try:
        assert await _version(db, "alembic_version_cli") == ["0001"]
    finally:
        await db.close()


async def test_ensure_database_copes_with_a_concurrent_create(postgres: EmbeddedPostgres) -> None:
    url = postgres.url("race_" + secrets.token_hex(4))
    created = await asyncio.gather(*(ensure_database(url) for _ in range(4)))
    assert created.count(True) <= 1
    db = Database(url)
    try:
        assert await db.ping() is True
    finally:
        await db.close()
