"""All I/O of webhooks: owners' signing secrets (encrypted at rest) and the HTTP delivery.

Secrets are stored as AES-256-GCM ciphertext (12-byte nonce + ciphertext, the owner as
associated data) under ``SHOAL_SCHEDULER_WEBHOOK_SECRETS_KEY``; the database never sees one in
clear. A delivery resolves the callback's host and refuses private or loopback addresses
unless they are allowed, then POSTs without following redirects.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import httpx
import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.dialects import postgresql

from shoal.common.observability import inject_trace
from shoal.common.storage import DatabaseClient
from shoal.scheduler.webhooks import SIGNATURE_HEADER, all_public

metadata = sa.MetaData()

# Mirrors migrations/0004_webhook_secrets.py.
webhook_secrets = sa.Table(
    "webhook_secrets",
    metadata,
    sa.Column("owner", sa.Text, primary_key=True),
    sa.Column("secret", sa.LargeBinary, nullable=False),
    sa.Column("previous", sa.LargeBinary),
    sa.Column("previous_until", sa.DateTime(timezone=True)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True, slots=True)
class SigningSecret:
    secret: str
    created_at: datetime
    previous: str | None = None
    previous_until: datetime | None = None


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


class SecretBox:
    """AES-256-GCM with the owner as associated data (a row moved to another owner fails)."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, owner: str, value: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, value.encode(), owner.encode())

    def open(self, owner: str, sealed: bytes) -> str:
        return self._aead.decrypt(sealed[:12], sealed[12:], owner.encode()).decode()


class SigningSecretStore:
    def __init__(self, db: DatabaseClient, box: SecretBox) -> None:
        self._db = db
        self._box = box

    async def get_or_create(self, owner: str, now: datetime) -> SigningSecret:
        """The owner's secret; the first call creates it (concurrent first calls agree)."""
        sealed = self._box.seal(owner, new_secret())
        insert = (
            postgresql.insert(webhook_secrets)
            .values(owner=owner, secret=sealed, created_at=now)
            .on_conflict_do_nothing(index_elements=[webhook_secrets.c.owner])
        )
        async with self._db.session() as session, session.begin():
            await session.execute(insert)
            row = (
                (
                    await session.execute(
                        sa.select(webhook_secrets).where(webhook_secrets.c.owner == owner)
                    )
                )
                .mappings()
                .one()
            )
        return self._secret(owner, row)

    async def rotate(self, owner: str, now: datetime, previous_until: datetime) -> SigningSecret:
        """A new secret; the old one still signs (as a second ``v1``) until ``previous_until``."""
        current = await self.get_or_create(owner, now)
        async with self._db.session() as session, session.begin():
            await session.execute(
                sa.update(webhook_secrets)
                .where(webhook_secrets.c.owner == owner)
                .values(
                    secret=self._box.seal(owner, new_secret()),
                    previous=self._box.seal(owner, current.secret),
                    previous_until=previous_until,
                    created_at=now,
                )
            )
        return await self.get_or_create(owner, now)

    def _secret(self, owner: str, row: sa.RowMapping) -> SigningSecret:
        previous = row["previous"]
        return SigningSecret(
            secret=self._box.open(owner, bytes(row["secret"])),
            created_at=row["created_at"],
            previous=self._box.open(owner, bytes(previous)) if previous is not None else None,
            previous_until=row["previous_until"],
        )


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    status: int | None
    error: str | None


class WebhookSender:
    """POSTs a signed body; refuses hosts that resolve to private addresses (SSRF guard)."""

    def __init__(self, *, timeout: float, allow_private: bool) -> None:
        self._client = httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        self._allow_private = allow_private

    async def close(self) -> None:
        await self._client.aclose()

    async def _public(self, url: str) -> bool:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError:
            return False
        return all_public(str(info[4][0]) for info in infos)

    async def post(self, url: str, body: bytes, signature: str, job_id: str) -> DeliveryResult:
        if not self._allow_private and not await self._public(url):
            return DeliveryResult(None, "refused: the host resolves to a private address")
        headers = inject_trace(
            {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: signature,
                "Shoal-Job-Id": job_id,
                "User-Agent": "shoal-webhooks/1",
            }
        )
        try:
            response = await self._client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return DeliveryResult(None, f"{type(exc).__name__}: {exc}"[:500])
        error = None if response.is_success else f"HTTP {response.status_code}"
        return DeliveryResult(response.status_code, error)
