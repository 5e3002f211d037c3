"""The schedules edge of the scheduler (transport only): the ``schedules.*`` RPCs.

``owner`` null = an admin (every owner's schedules):
- ``schedules.create`` ``{owner, schedule: {cron | every | at, timezone?, catch_up?, target}}``
  -> the schedule
- ``schedules.get`` ``{owner, id}`` -> the schedule with its last firings
- ``schedules.list`` ``{owner, limit?, cursor?}`` -> ``{schedules, next}``
- ``schedules.delete`` ``{owner, id}`` -> ``{deleted: true}``
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from shoal.common.errors import BadRequest
from shoal.common.messaging import Subjects, serve
from shoal.scheduler.job_handlers import QUEUE
from shoal.scheduler.schedule_service import ScheduleService


def _owner(body: dict[str, Any]) -> str | None:
    owner = body.get("owner")
    if owner is not None and not isinstance(owner, str):
        raise BadRequest("owner must be a string or null")
    return owner


def _id(body: dict[str, Any]) -> str:
    value = body.get("id")
    if not isinstance(value, str):
        raise BadRequest("id must be a string")
    return value


async def serve_schedules(
    nc: NATS, subjects: Subjects, service: ScheduleService
) -> list[Subscription]:
    """Answer the ``schedules.*`` RPCs (see the module docstring)."""

    async def create(body: dict[str, Any]) -> Any:
        owner, schedule = body.get("owner"), body.get("schedule")
        if not isinstance(owner, str) or not isinstance(schedule, dict):
            raise BadRequest("owner must be a string and schedule an object")
        return await service.create(owner, schedule)

    async def get(body: dict[str, Any]) -> Any:
        return await service.get(_owner(body), _id(body))

    async def list_schedules(body: dict[str, Any]) -> Any:
        limit, cursor = body.get("limit"), body.get("cursor")
        return await service.page(
            _owner(body),
            limit if isinstance(limit, int) else 50,
            cursor if isinstance(cursor, str) else None,
        )

    async def delete(body: dict[str, Any]) -> Any:
        await service.delete(_owner(body), _id(body))
        return {"deleted": True}

    routes = {
        "schedules.create": create,
        "schedules.get": get,
        "schedules.list": list_schedules,
        "schedules.delete": delete,
    }
    return [await serve(nc, subjects.rpc("scheduler", m), QUEUE, h) for m, h in routes.items()]
