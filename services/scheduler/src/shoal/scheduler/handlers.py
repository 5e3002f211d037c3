"""The edges of the scheduler (transport only): the timer RPCs, and the loop that fires."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from shoal.common.clock import iso
from shoal.common.errors import BadRequest
from shoal.common.messaging import Subjects, dumps, serve
from shoal.scheduler.metrics import FIRED, PUBLISH_FAILURES
from shoal.scheduler.service import TimerService

log = logging.getLogger(__name__)

QUEUE = "scheduler"
_ERROR_BACKOFF_S = 1.0


def _str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    return value


def _time(body: dict[str, Any], name: str) -> datetime:
    try:
        value = datetime.fromisoformat(_str(body, name))
    except ValueError as exc:
        raise BadRequest(f"{name} must be an RFC 3339 time") from exc
    if value.tzinfo is None:
        raise BadRequest(f"{name} must carry a time zone (e.g. Z)")
    return value.astimezone(UTC)


async def serve_scheduler(
    nc: NATS, subjects: Subjects, service: TimerService
) -> list[Subscription]:
    """Answer ``rpc("scheduler", "set_timer" | "cancel_timer")``.

    ``set_timer`` ``{"id", "fire_at": RFC 3339, "subject", "payload": <JSON>}`` -> ``{"id",
    "fire_at"}``: the JSON encoding of ``payload`` is what gets published.
    ``cancel_timer`` ``{"id"}`` -> ``{"cancelled": bool}``.
    """

    async def set_timer(body: dict[str, Any]) -> dict[str, Any]:
        timer_id, fire_at = _str(body, "id"), _time(body, "fire_at")
        await service.set_timer(
            timer_id, fire_at, _str(body, "subject"), dumps(body.get("payload"))
        )
        return {"id": timer_id, "fire_at": iso(fire_at.timestamp())}

    async def cancel_timer(body: dict[str, Any]) -> dict[str, Any]:
        return {"cancelled": await service.cancel(_str(body, "id"))}

    routes = {"set_timer": set_timer, "cancel_timer": cancel_timer}
    subscriptions = [
        await serve(nc, subjects.rpc("scheduler", m), QUEUE, h) for m, h in routes.items()
    ]
    await nc.flush()  # the server knows the subscriptions before start-up reports ready
    return subscriptions


class TimerLoop:
    """Calls :meth:`TimerService.fire_due` every poll interval, or at once when woken."""

    def __init__(
        self,
        service: TimerService,
        poll_interval: timedelta,
        batch_size: int,
        wake: asyncio.Event,
    ) -> None:
        self._service = service
        self._poll = poll_interval.total_seconds()
        self._batch_size = batch_size
        self._wake = wake  # set when a timer is armed: look now rather than at the next poll
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """The loop is alive (what /readyz reports)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler-timers")

    async def stop(self) -> None:
        # A pass cancelled mid-way rolls back: its timers stay due, and any already published
        # are deduplicated by their Nats-Msg-Id when the next replica fires them.
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                result = await self._service.fire_due()
            except Exception:
                log.warning("firing due timers failed", exc_info=True)
                await asyncio.sleep(_ERROR_BACKOFF_S)
                continue
            FIRED.inc(result.fired)
            PUBLISH_FAILURES.inc(result.failed)
            if result.claimed >= self._batch_size and not result.failed:
                continue  # more may be due right now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)
