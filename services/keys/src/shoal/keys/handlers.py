"""RPC handlers of the keys service (transport only): decode, call the service, shape the reply."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from shoal.common.clock import iso
from shoal.common.errors import BadRequest
from shoal.common.messaging import Subjects, serve
from shoal.keys.service import KeyService, key_view

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


async def serve_keys(nc: NATS, subjects: Subjects, service: KeyService) -> list[Subscription]:
    """Answer ``rpc("keys", verify|create|list|revoke)``; returns the subscriptions to drain."""

    async def verify(body: dict[str, Any]) -> dict[str, Any]:
        key = await service.verify(_str(body, "key"))
        return {"key_id": key.key_id, "owner": key.owner, "scopes": key.scopes, "name": key.name}

    async def create(body: dict[str, Any]) -> dict[str, Any]:
        row, key = await service.create(
            name=_str(body, "name"), owner=_str(body, "owner"), scopes=_str_list(body, "scopes")
        )
        return {
            "id": row.id,
            "key": key,
            "name": row.name,
            "owner": row.owner,
            "scopes": row.scopes,
            "created_at": iso(row.created_at.timestamp()),
        }

    async def list_keys(body: dict[str, Any]) -> dict[str, Any]:
        owner = body.get("owner")
        if owner is not None and not isinstance(owner, str):
            raise BadRequest("owner must be a string or null")
        return {"keys": [key_view(row) for row in await service.list_keys(owner)]}

    async def revoke(body: dict[str, Any]) -> dict[str, Any]:
        await service.revoke(_str(body, "id"))
        return {}

    routes = {"verify": verify, "create": create, "list": list_keys, "revoke": revoke}
    subscriptions = [await serve(nc, subjects.rpc("keys", m), QUEUE, h) for m, h in routes.items()]
    await nc.flush()  # the server knows the subscriptions before start-up reports ready
    return subscriptions
