"""All I/O of the keys service: ``api_keys``, ``data_keys``, ``secrets``, the revocation
broadcast and the audit stream. Plaintext secret values never reach this module: it stores
and returns ciphertext, and the sealing callbacks it runs are handed in by the service."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from nats.aio.client import Client as NATS
from sqlalchemy.dialects import postgresql

from shoal.common.clock import Clock, iso
from shoal.common.messaging import MSG_ID_HEADER, Envelope, Subjects, dumps, encode, new_id
from shoal.common.storage import DatabaseClient

log = logging.getLogger(__name__)

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

    async def revoke(self, key_id: str, at: datetime) -> str | None:
        """Mark the key revoked (keeping the first revocation time); its owner, ``None`` if
        unknown."""
        stmt = (
            sa.update(api_keys)
            .where(api_keys.c.id == key_id)
            .values(revoked_at=sa.func.coalesce(api_keys.c.revoked_at, at))
            .returning(api_keys.c.owner)
        )
        async with self._db.session() as session, session.begin():
            owner: str | None = (await session.execute(stmt)).scalar_one_or_none()
        return owner

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


# -- secrets -----------------------------------------------------------------------------------

# Mirror migrations/0002_secrets.py.
data_keys = sa.Table(
    "data_keys",
    metadata,
    sa.Column("owner", sa.Text, primary_key=True),
    sa.Column("kek_id", sa.Text, nullable=False),
    sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)

secrets_table = sa.Table(
    "secrets",
    metadata,
    sa.Column("owner", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("nonce", sa.LargeBinary, nullable=False),
    sa.Column("ciphertext", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

_PUT_ATTEMPTS = 3  # a first put of one name by two callers at once: the loser retries as update


@dataclass(frozen=True, slots=True)
class DataKeyRow:
    owner: str
    kek_id: str
    wrapped_key: bytes = b""
    created_at: datetime | None = None
    version: int = 1


@dataclass(frozen=True, slots=True)
class SecretRow:
    owner: str
    name: str
    version: int
    created_at: datetime
    updated_at: datetime
    nonce: bytes = b""
    ciphertext: bytes = b""


# (version) -> (nonce, ciphertext): the service seals the value for the version the store picks.
Sealer = Callable[[int], tuple[bytes, bytes]]
# a data key row -> its DEK wrapped under the target KEK (raises to skip the row).
Rewrapper = Callable[[DataKeyRow], bytes]


def _data_key(m: sa.RowMapping) -> DataKeyRow:
    return DataKeyRow(
        owner=m["owner"],
        kek_id=m["kek_id"],
        wrapped_key=bytes(m["wrapped_key"]),
        created_at=m["created_at"],
        version=m["version"],
    )


def _secret(m: sa.RowMapping, *, with_ciphertext: bool = True) -> SecretRow:
    return SecretRow(
        owner=m["owner"],
        name=m["name"],
        version=m["version"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        nonce=bytes(m["nonce"]) if with_ciphertext else b"",
        ciphertext=bytes(m["ciphertext"]) if with_ciphertext else b"",
    )


@dataclass(frozen=True, slots=True)
class RewrapFailure:
    owner: str
    kek_id: str
    reason: str


class SecretStore:
    """``data_keys`` (wrapped DEKs) and ``secrets`` (ciphertext only)."""

    def __init__(self, db: DatabaseClient) -> None:
        self._db = db

    async def data_key(self, owner: str) -> DataKeyRow | None:
        async with self._db.session() as session:
            result = await session.execute(sa.select(data_keys).where(data_keys.c.owner == owner))
            mapping = result.mappings().first()
        return _data_key(mapping) if mapping is not None else None

    async def insert_data_key(self, row: DataKeyRow) -> DataKeyRow:
        """Insert ``row`` unless the owner has a data key already; returns the one that is kept."""
        stmt = (
            postgresql.insert(data_keys)
            .values(
                owner=row.owner,
                kek_id=row.kek_id,
                wrapped_key=row.wrapped_key,
                created_at=row.created_at,
                version=row.version,
            )
            .on_conflict_do_nothing(index_elements=[data_keys.c.owner])
            .returning(*data_keys.c)
        )
        async with self._db.session() as session, session.begin():
            mapping = (await session.execute(stmt)).mappings().first()
        if mapping is not None:
            return _data_key(mapping)
        kept = await self.data_key(row.owner)
        assert kept is not None, "data keys are never deleted"
        return kept

    async def put(self, owner: str, name: str, at: datetime, sealer: Sealer) -> SecretRow:
        """Write the next version of ``owner``/``name`` (1 if new), sealed by ``sealer``."""
        c = secrets_table.c
        for _ in range(_PUT_ATTEMPTS):
            async with self._db.session() as session, session.begin():
                current = (
                    await session.execute(
                        sa.select(c.version, c.created_at)
                        .where(c.owner == owner, c.name == name)
                        .with_for_update()
                    )
                ).first()
                if current is not None:
                    version = current.version + 1
                    nonce, ciphertext = sealer(version)
                    await session.execute(
                        sa.update(secrets_table)
                        .where(c.owner == owner, c.name == name)
                        .values(version=version, nonce=nonce, ciphertext=ciphertext, updated_at=at)
                    )
                    return SecretRow(owner, name, version, current.created_at, at)
                nonce, ciphertext = sealer(1)
                inserted = await session.execute(
                    postgresql.insert(secrets_table)
                    .values(
                        owner=owner,
                        name=name,
                        version=1,
                        nonce=nonce,
                        ciphertext=ciphertext,
                        created_at=at,
                        updated_at=at,
                    )
                    .on_conflict_do_nothing()
                )
                if inserted.rowcount:  # type: ignore[attr-defined]
                    return SecretRow(owner, name, 1, at, at)
        raise RuntimeError("secret write kept conflicting")

    async def get(self, owner: str, name: str) -> tuple[SecretRow, DataKeyRow] | None:
        """The secret's ciphertext and its owner's wrapped data key, or ``None``."""
        query = (
            sa.select(
                secrets_table,
                data_keys.c.kek_id,
                data_keys.c.wrapped_key,
                data_keys.c.created_at.label("dk_created_at"),
                data_keys.c.version.label("dk_version"),
            )
            .join(data_keys, data_keys.c.owner == secrets_table.c.owner)
            .where(secrets_table.c.owner == owner, secrets_table.c.name == name)
        )
        async with self._db.session() as session:
            m = (await session.execute(query)).mappings().first()
        if m is None:
            return None
        dk = DataKeyRow(
            owner=owner,
            kek_id=m["kek_id"],
            wrapped_key=bytes(m["wrapped_key"]),
            created_at=m["dk_created_at"],
            version=m["dk_version"],
        )
        return _secret(m), dk

    async def list_secrets(self, owner: str) -> list[SecretRow]:
        """Names and dates of ``owner``'s secrets (no ciphertext), by name."""
        c = secrets_table.c
        query = (
            sa.select(c.owner, c.name, c.version, c.created_at, c.updated_at)
            .where(c.owner == owner)
            .order_by(c.name)
        )
        async with self._db.session() as session:
            result = await session.execute(query)
            return [
                SecretRow(m["owner"], m["name"], m["version"], m["created_at"], m["updated_at"])
                for m in result.mappings().all()
            ]

    async def delete(self, owner: str, name: str) -> bool:
        c = secrets_table.c
        stmt = sa.delete(secrets_table).where(c.owner == owner, c.name == name)
        async with self._db.session() as session, session.begin():
            result = await session.execute(stmt)
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def rewrap_all(
        self, to_kek_id: str, rewrap: Rewrapper, *, batch: int = 100
    ) -> tuple[int, list[RewrapFailure]]:
        """Re-wrap every data key not under ``to_kek_id``, ``batch`` rows per transaction.

        Rows are locked (``FOR UPDATE``) in owner order while re-wrapped, so a concurrent
        rotation waits and then skips them (PostgreSQL re-checks ``kek_id`` after the wait), and
        readers never see a half-written row. A row ``rewrap`` raises on is left as it was and
        reported. Returns ``(rewrapped, failures)``.
        """
        c = data_keys.c
        done = 0
        failures: list[RewrapFailure] = []
        after = ""
        while True:
            async with self._db.session() as session, session.begin():
                result = await session.execute(
                    sa.select(data_keys)
                    .where(c.kek_id != to_kek_id, c.owner > after)
                    .order_by(c.owner)
                    .limit(batch)
                    .with_for_update()
                )
                rows = [_data_key(m) for m in result.mappings().all()]
                for row in rows:
                    try:
                        wrapped = rewrap(row)
                    except Exception as exc:  # reported per row; the rest still rotate
                        failures.append(RewrapFailure(row.owner, row.kek_id, type(exc).__name__))
                        continue
                    await session.execute(
                        sa.update(data_keys)
                        .where(c.owner == row.owner)
                        .values(kek_id=to_kek_id, wrapped_key=wrapped, version=c.version + 1)
                    )
                    done += 1
            if not rows:
                return done, failures
            after = rows[-1].owner

    async def count_by_kek(self) -> dict[str, int]:
        c = data_keys.c
        async with self._db.session() as session:
            result = await session.execute(sa.select(c.kek_id, sa.func.count()).group_by(c.kek_id))
            return {kek_id: int(n) for kek_id, n in result.all()}


# -- audit ---------------------------------------------------------------------------------------


class NatsAudit:
    """Publishes audit events to JetStream, ``<prefix>.audit.<kind>`` (see audit.py)."""

    def __init__(self, nc: NATS, subjects: Subjects, clock: Clock, *, timeout: float = 2.0) -> None:
        self._js = nc.jetstream(timeout=timeout)
        self._subjects = subjects
        self._clock = clock

    async def emit(
        self, kind: str, *, owner: str | None, subject: str, data: dict[str, Any]
    ) -> None:
        envelope = Envelope(
            id=new_id("aud"),
            type=kind,
            source="keys",
            time=iso(self._clock.now()),
            subject=subject,
            owner=owner,
            data=data,
        )
        await self._js.publish(
            f"{self._subjects.prefix}.audit.{kind}",
            encode(envelope),
            headers={MSG_ID_HEADER: envelope.id},
        )
