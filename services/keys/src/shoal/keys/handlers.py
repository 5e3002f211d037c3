"""RPC handlers of the keys service (transport only): decode, call the service, shape the reply.

Secret values cross NATS in clear in two places only: the ``secrets.put`` request and the
``secrets.get`` reply (docs/CONTRACTS.md, "Secrets"). Nothing here logs a body.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from shoal.common.clock import iso
from shoal.common.errors import BadRequest
from shoal.common.messaging import Subjects, serve
from shoal.common.messaging.rpc import Handler
from shoal.keys.service import MAX_KEY_LIFETIME, KeyService, key_view
from shoal.keys.store import SecretRow
from shoal.keys.vault import SecretService, check_actor

QUEUE = "keys"


def _str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    return value


def _str_list(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{name} must be a list of strings")
    return value


def _expiry(body: dict[str, Any]) -> tuple[datetime | None, timedelta | None]:
    """``expires_at`` (RFC 3339 with offset) or ``expires_in_seconds`` (positive integer)."""
    at, seconds = body.get("expires_at"), body.get("expires_in_seconds")
    expires_at = expires_in = None
    if at is not None:
        try:
            expires_at = datetime.fromisoformat(at) if isinstance(at, str) else None
        except ValueError:
            expires_at = None
        if expires_at is None or expires_at.tzinfo is None:
            raise BadRequest("expires_at must be an RFC 3339 time with a UTC offset")
    if seconds is not None:
        limit = int(MAX_KEY_LIFETIME.total_seconds())
        if isinstance(seconds, bool) or not isinstance(seconds, int) or not 0 < seconds <= limit:
            raise BadRequest(f"expires_in_seconds must be an integer in 1..{limit}")
        expires_in = timedelta(seconds=seconds)
    return expires_at, expires_in


def _secret_view(row: SecretRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "version": row.version,
        "created_at": iso(row.created_at.timestamp()),
        "updated_at": iso(row.updated_at.timestamp()),
    }


def key_routes(service: KeyService) -> dict[str, Handler]:
    async def verify(body: dict[str, Any]) -> dict[str, Any]:
        key = await service.verify(_str(body, "key"))
        return {
            "key_id": key.key_id,
            "owner": key.owner,
            "scopes": key.scopes,
            "name": key.name,
            "expires_at": key.expires_at,
        }

    async def create(body: dict[str, Any]) -> dict[str, Any]:
        expires_at, expires_in = _expiry(body)
        row, key = await service.create(
            name=_str(body, "name"),
            owner=_str(body, "owner"),
            scopes=_str_list(body, "scopes"),
            expires_at=expires_at,
            expires_in=expires_in,
        )
        return {
            "id": row.id,
            "key": key,
            "name": row.name,
            "owner": row.owner,
            "scopes": row.scopes,
            "created_at": iso(row.created_at.timestamp()),
            "expires_at": iso(row.expires_at.timestamp()) if row.expires_at else None,
        }

    async def list_keys(body: dict[str, Any]) -> dict[str, Any]:
        owner = body.get("owner")
        if owner is not None and not isinstance(owner, str):
            raise BadRequest("owner must be a string or null")
        return {"keys": [key_view(row) for row in await service.list_keys(owner)]}

    async def revoke(body: dict[str, Any]) -> dict[str, Any]:
        await service.revoke(_str(body, "id"))
        return {}

    return {"verify": verify, "create": create, "list": list_keys, "revoke": revoke}


def secret_routes(secrets: SecretService) -> dict[str, Handler]:
    async def put(body: dict[str, Any]) -> dict[str, Any]:
        row = await secrets.put(
            _str(body, "owner"),
            _str(body, "name"),
            _str(body, "value"),
            actor=check_actor(body.get("actor")),
        )
        return {
            "name": row.name,
            "version": row.version,
            "updated_at": iso(row.updated_at.timestamp()),
        }

    async def list_secrets(body: dict[str, Any]) -> dict[str, Any]:
        rows = await secrets.list_secrets(_str(body, "owner"))
        return {"secrets": [_secret_view(row) for row in rows]}

    async def get(body: dict[str, Any]) -> dict[str, Any]:
        row, value = await secrets.get(
            _str(body, "owner"),
            _str(body, "name"),
            actor=check_actor(body.get("actor")),
        )
        return {"name": row.name, "value": value}

    async def delete(body: dict[str, Any]) -> dict[str, Any]:
        deleted = await secrets.delete(
            _str(body, "owner"),
            _str(body, "name"),
            actor=check_actor(body.get("actor")),
        )
        return {"deleted": deleted}

    async def rotate_kek(body: dict[str, Any]) -> dict[str, Any]:
        to_kek_id = body.get("to_kek_id")
        if to_kek_id is not None and not isinstance(to_kek_id, str):
            raise BadRequest("to_kek_id must be a string or null")
        report = await secrets.rotate_kek(to_kek_id)
        return {
            "to_kek_id": report.to_kek_id,
            "rewrapped": report.rewrapped,
            "remaining": report.remaining,
            "by_kek": report.by_kek,
            "failed": report.failed,
        }

    return {
        "secrets.put": put,
        "secrets.list": list_secrets,
        "secrets.get": get,
        "secrets.delete": delete,
        "admin.rotate_kek": rotate_kek,
    }


async def serve_keys(
    nc: NATS, subjects: Subjects, service: KeyService, secrets: SecretService
) -> list[Subscription]:
    """Answer every ``rpc("keys", ...)``; returns the subscriptions to drain."""
    routes = {**key_routes(service), **secret_routes(secrets)}
    subscriptions = [await serve(nc, subjects.rpc("keys", m), QUEUE, h) for m, h in routes.items()]
    await nc.flush()  # the server knows the subscriptions before start-up reports ready
    return subscriptions
