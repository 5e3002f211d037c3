"""All I/O of the keys service: the ``api_keys`` table, and the revocation broadcast."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from nats.aio.client import Client as NATS
from sqlalchemy.dialects import postgresql

from shoal.common.messaging import Subjects, dumps
from shoal.common.storage import DatabaseClient

metadata = sa.MetaData()

# Mirrors migrations/0001_initial.py; the migration, not this table, creates the schema.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("scopes", postgresql.ARRAY(sa.Text), nullable=False),
    sa.Column("key_hash", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True)),
    sa.Column("last_used_at", sa.DateTime(timezone=True)),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    id: str
    owner: str
    name: str
    scopes: list[str]
    key_hash: str
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


def _row(mapping: sa.RowMapping) -> ApiKeyRow:
    return ApiKeyRow(
        id=mapping["id"],
        owner=mapping["owner"],
        name=mapping["name"],
        scopes=list(mapping["scopes"]),
        key_hash=mapping["key_hash"],
        created_at=mapping["created_at"],
        expires_at=mapping["expires_at"],
        last_used_at=mapping["last_used_at"],
        revoked_at=mapping["revoked_at"],
    )


class KeyStore:
    """The ``api_keys`` table (hashes only; a key itself is never stored)."""

    def __init__(self, db: DatabaseClient) -> None:
        self._db = db

    async def insert(self, row: ApiKeyRow) -> bool:
        """Insert ``row``; ``False`` if its id is taken."""
        stmt = (
            postgresql.insert(api_keys)
            .values(**_values(row))
            .on_conflict_do_nothing(index_elements=[api_keys.c.id])
        )
        async with self._db.session() as session, session.begin():
            result = await session.execute(stmt)
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def upsert(self, row: ApiKeyRow) -> None:
        """Insert ``row`` or overwrite the one with its id (un-revoking it)."""
        values = _values(row)
        stmt = postgresql.insert(api_keys).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[api_keys.c.id],
            set_={k: stmt.excluded[k] for k in values if k not in ("id", "created_at")},
        )
        async with self._db.session() as session, session.begin():
            await session.execute(stmt)

    async def get(self, key_id: str) -> ApiKeyRow | None:
        async with self._db.session() as session:
            result = await session.execute(sa.select(api_keys).where(api_keys.c.id == key_id))
            mapping = result.mappings().first()
        return _row(mapping) if mapping is not None else None

    async def list_keys(self, owner: str | None) -> list[ApiKeyRow]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if owner is not None:
            query = query.where(api_keys.c.owner == owner)
        async with self._db.session() as session:
            result = await session.execute(query)
            return [_row(m) for m in result.mappings().all()]

    async def revoke(self, key_id: str, at: datetime) -> bool:
        """Mark the key revoked (keeping the first revocation time); ``False`` if unknown."""
        stmt = (
            sa.update(api_keys)
            .where(api_keys.c.id == key_id)
            .values(revoked_at=sa.func.coalesce(api_keys.c.revoked_at, at))
        )
        async with self._db.session() as session, session.begin():
            result = await session.execute(stmt)
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def touch(self, key_id: str, at: datetime, not_since: datetime) -> None:
        """Set last_used_at = ``at`` unless any replica set it after ``not_since``."""
        stmt = (
            sa.update(api_keys)
            .where(api_keys.c.id == key_id)
            .where(sa.or_(api_keys.c.last_used_at.is_(None), api_keys.c.last_used_at <= not_since))
            .values(last_used_at=at)
        )
        async with self._db.session() as session, session.begin():
            await session.execute(stmt)


def _values(row: ApiKeyRow) -> dict[str, object]:
    return {
        "id": row.id,
        "owner": row.owner,
        "name": row.name,
        "scopes": row.scopes,
        "key_hash": row.key_hash,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "last_used_at": row.last_used_at,
        "revoked_at": row.revoked_at,
    }


class NatsRevocations:
    """Tells every replica of every service that a key is revoked (core-NATS fan-out)."""

    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        self._nc = nc
        self._subject = subjects.broadcast("keys.revoked")

    async def revoked(self, key_id: str) -> None:
        await self._nc.publish(self._subject, dumps({"key_id": key_id}))
        # Flush so the revocation is on the wire before the RPC answers "done".
        await self._nc.flush()
