"""The rules of platform API keys: issue, verify, list, revoke. No transport here.

Every refusal of a presented key is the same :class:`Unauthorized` — unknown, mistyped,
revoked and expired keys are indistinguishable to the caller. Keys are never logged.
Creation, revocation and the use of an admin-scoped key are audit events (audit.py).
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from shoal.common.clock import Clock, iso
from shoal.common.errors import BadRequest, NotFound, Unauthorized, Unavailable
from shoal.common.messaging import is_token
from shoal.keys.audit import (
    KEY_ADMIN_USED,
    KEY_CREATED,
    KEY_REVOKED,
    AdminUseThrottle,
    Audit,
    emit_after_commit,
)
from shoal.keys.keyformat import generate_key, hash_key, parse_key
from shoal.keys.store import ApiKeyRow, KeyStore

log = logging.getLogger(__name__)

SCOPES = frozenset({"admin", "sessions", "jobs", "jobs:work", "secrets", "read"})
DEV_ADMIN_ID = "dev-admin"
DEV_ADMIN_OWNER = "admin"
MAX_KEY_LENGTH = 512  # longer input is refused before hashing it
MAX_NAME_LENGTH = 200
MAX_KEY_LIFETIME = timedelta(days=3650)
_INSERT_ATTEMPTS = 3  # ids are 71 random bits: a collision is already one in ~10^21


class Revocations(Protocol):
    async def revoked(self, key_id: str) -> None:
        """Announce that ``key_id`` no longer authenticates anyone."""
        ...


@dataclass(frozen=True, slots=True)
class VerifiedKey:
    key_id: str
    owner: str
    name: str
    scopes: list[str]
    # RFC 3339 or None: gateways never cache a verified key past it.
    expires_at: str | None = None


def key_view(row: ApiKeyRow) -> dict[str, object]:
    """The listing form of a key: no hash, times as RFC 3339."""
    return {
        "id": row.id,
        "name": row.name,
        "owner": row.owner,
        "scopes": row.scopes,
        "created_at": iso(row.created_at.timestamp()),
        "expires_at": iso(row.expires_at.timestamp()) if row.expires_at else None,
        "last_used_at": iso(row.last_used_at.timestamp()) if row.last_used_at else None,
        "revoked_at": iso(row.revoked_at.timestamp()) if row.revoked_at else None,
    }


class KeyService:
    def __init__(
        self,
        store: KeyStore,
        revocations: Revocations,
        *,
        pepper: bytes,
        clock: Clock,
        touch_interval: timedelta = timedelta(minutes=1),
        audit: Audit,
        admin_audit_interval: timedelta = timedelta(minutes=1),
    ) -> None:
        self._store = store
        self._audit = audit
        self._admin_uses = AdminUseThrottle(clock, admin_audit_interval.total_seconds())
        self._revocations = revocations
        self._pepper = pepper
        self._clock = clock
        self._touch_interval = touch_interval
        self._dev_admin_hash: str | None = None

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.now(), tz=UTC)

    async def ensure_dev_admin(self, key: str) -> None:
        """Make ``key`` (any string) the ``dev-admin`` key, scopes ``["admin"]`` (development)."""
        if not key:
            raise BadRequest("the dev admin key is empty")
        digest = hash_key(self._pepper, key)
        await self._store.upsert(
            ApiKeyRow(
                id=DEV_ADMIN_ID,
                owner=DEV_ADMIN_OWNER,
                name="development admin",
                scopes=["admin"],
                key_hash=digest,
                created_at=self._now(),
            )
        )
        self._dev_admin_hash = digest

    async def verify(self, key: str) -> VerifiedKey:
        """The key's identity and scopes, or :class:`Unauthorized`; touches last_used_at."""
        if not key or len(key) > MAX_KEY_LENGTH:
            raise Unauthorized()
        digest = hash_key(self._pepper, key)
        key_id = parse_key(key)
        # The dev admin key may be any string, so it is recognised by its hash, not its form.
        if self._dev_admin_hash is not None and hmac.compare_digest(digest, self._dev_admin_hash):
            key_id = DEV_ADMIN_ID
        if key_id is None:
            raise Unauthorized()
        row = await self._store.get(key_id)
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            raise Unauthorized()
        now = self._now()
        if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
            raise Unauthorized()
        not_since = now - self._touch_interval
        if row.last_used_at is None or row.last_used_at <= not_since:
            await self._store.touch(row.id, now, not_since)
        if "admin" in row.scopes and self._admin_uses.due(row.id):
            await emit_after_commit(
                self._audit, KEY_ADMIN_USED, owner=row.owner, subject=row.id, data={}
            )
        expires_at = iso(row.expires_at.timestamp()) if row.expires_at else None
        return VerifiedKey(
            key_id=row.id, owner=row.owner, name=row.name, scopes=row.scopes, expires_at=expires_at
        )

    async def create(
        self,
        *,
        name: str,
        owner: str,
        scopes: list[str],
        expires_at: datetime | None = None,
        expires_in: timedelta | None = None,
    ) -> tuple[ApiKeyRow, str]:
        """Issue a key; returns its row and the key itself, which is shown only this once."""
        now = self._now()
        if expires_in is not None:
            if expires_at is not None:
                raise BadRequest("give expires_at or expires_in_seconds, not both")
            expires_at = now + expires_in
        if expires_at is not None and not now < expires_at <= now + MAX_KEY_LIFETIME:
            raise BadRequest(
                f"expiry must be in the future and within {MAX_KEY_LIFETIME.days} days"
            )
        if not name or len(name) > MAX_NAME_LENGTH:
            raise BadRequest(f"name must be 1..{MAX_NAME_LENGTH} characters")
        if not is_token(owner):
            raise BadRequest("owner must be 1..128 characters of A-Z a-z 0-9 _ -")
        unknown = sorted(set(scopes) - SCOPES)
        if not scopes or unknown:
            raise BadRequest(
                "scopes must be a non-empty subset of " + ", ".join(sorted(SCOPES)),
                detail={"unknown": unknown},
            )
        for _ in range(_INSERT_ATTEMPTS):
            key_id, key = generate_key()
            row = ApiKeyRow(
                id=key_id,
                owner=owner,
                name=name,
                scopes=sorted(set(scopes)),
                key_hash=hash_key(self._pepper, key),
                created_at=now,
                expires_at=expires_at,
            )
            if await self._store.insert(row):
                log.info("key created", extra={"key_id": key_id, "owner": owner})
                await emit_after_commit(
                    self._audit,
                    KEY_CREATED,
                    owner=owner,
                    subject=key_id,
                    data={
                        "name": name,
                        "scopes": row.scopes,
                        "expires_at": iso(expires_at.timestamp()) if expires_at else None,
                    },
                )
                return row, key
        raise Unavailable("could not allocate a key id")

    async def list_keys(self, owner: str | None) -> list[ApiKeyRow]:
        return await self._store.list_keys(owner)

    async def revoke(self, key_id: str) -> None:
        """Revoke ``key_id`` (idempotent) and announce it after the write is committed."""
        owner = await self._store.revoke(key_id, self._now())
        if owner is None:
            raise NotFound("key not found", detail={"id": key_id})
        log.info("key revoked", extra={"key_id": key_id})
        await self._revocations.revoked(key_id)
        await emit_after_commit(self._audit, KEY_REVOKED, owner=owner, subject=key_id, data={})
