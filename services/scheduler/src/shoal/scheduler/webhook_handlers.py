"""The webhooks edge of the scheduler (transport only).

- ``webhooks.secret`` ``{owner}`` -> ``{secret, created_at, previous_expires_at?}`` (created on
  first use)
- ``webhooks.rotate`` ``{owner}`` -> the new secret, the same shape
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from shoal.common.errors import BadRequest
from shoal.common.messaging import Subjects, serve
from shoal.scheduler.job_handlers import QUEUE
from shoal.scheduler.webhook_service import WebhookService


def _owner(body: dict[str, Any]) -> str:
    owner = body.get("owner")
    if not isinstance(owner, str) or not owner:
        raise BadRequest("owner must be a string")
    return owner


async def serve_webhooks(
    nc: NATS, subjects: Subjects, service: WebhookService
) -> list[Subscription]:
    async def secret(body: dict[str, Any]) -> Any:
        return await service.signing_secret(_owner(body))

    async def rotate(body: dict[str, Any]) -> Any:
        return await service.rotate(_owner(body))

    routes = {"webhooks.secret": secret, "webhooks.rotate": rotate}
    return [await serve(nc, subjects.rpc("scheduler", m), QUEUE, h) for m, h in routes.items()]
