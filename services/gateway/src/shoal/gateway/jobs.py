"""Jobs, ``/run`` and schedules on behalf of a caller: owners, then the scheduler's RPCs.

No transport here; answers are ``views`` structs, converted from the scheduler's replies as they
arrive. A job belongs to the owner of the key that created it; another owner's job
is 404 (an admin key sees every owner's). ``run`` submits a job and waits for the scheduler's
``jobs.ended`` broadcast, at most ``wait`` seconds.

Example::

    jobs = Jobs(bus)
    job = await jobs.submit(principal, JobRequest(kind="resize", input={"w": 64}))
    finished, job = await jobs.run(principal, JobRequest(kind="resize"), wait=30)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from shoal.common.errors import ShoalError
from shoal.common.messaging import loads
from shoal.gateway import tenancy
from shoal.gateway.service import Principal
from shoal.gateway.views import (
    JobRequest,
    JobsPage,
    JobView,
    ScheduleRequest,
    SchedulesPage,
    ScheduleView,
    SigningSecret,
    convert,
)

log = logging.getLogger(__name__)

MAX_RUN_WAIT_S = 60.0
TERMINAL = frozenset({"succeeded", "cancelled", "dead"})


class SchedulerBus(Protocol):
    """The scheduler's RPCs and broadcasts (``bus.Bus`` in production)."""

    async def scheduler_rpc(
        self,
        method: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - passed to the request
    ) -> Any: ...

    async def subscribe_broadcast(
        self, topic: str, callback: Callable[[Msg], Awaitable[None]], *, queue: str = ""
    ) -> Subscription: ...

    async def publish_broadcast(self, topic: str, body: dict[str, Any]) -> None: ...


def reader(principal: Principal) -> str | None:
    """Whose jobs a caller may read: its owner's, or (admin) everyone's."""
    return None if principal.is_admin else principal.owner


class EndedJobs:
    """One subscription to ``jobs.ended.*`` per gateway; ``/run`` requests wait on it by id."""

    def __init__(self, bus: SchedulerBus) -> None:
        self._bus = bus
        self._waiting: dict[str, list[asyncio.Future[JobView]]] = {}
        self._sub: Subscription | None = None
        self._lock = asyncio.Lock()

    async def _ensure(self) -> None:
        async with self._lock:
            if self._sub is None:
                self._sub = await self._bus.subscribe_broadcast("jobs.ended.*", self._on_ended)

    async def _on_ended(self, msg: Msg) -> None:
        job_id = msg.subject.rsplit(".", 1)[-1]
        futures = self._waiting.pop(job_id, None)
        if not futures:
            return
        try:
            job = msgspec.convert(loads(msg.data).get("job"), JobView)
        except (ShoalError, AttributeError, msgspec.ValidationError):
            return
        for future in futures:
            if not future.done():
                future.set_result(job)

    async def watch(self, job_id: str) -> asyncio.Future[JobView]:
        await self._ensure()
        future: asyncio.Future[JobView] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, []).append(future)
        return future

    def forget(self, job_id: str, future: asyncio.Future[JobView]) -> None:
        futures = self._waiting.get(job_id)
        if futures and future in futures:
            futures.remove(future)
            if not futures:
                del self._waiting[job_id]

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()
            self._sub = None


class Jobs:
    """The jobs and schedules API for one gateway process."""

    def __init__(self, bus: SchedulerBus) -> None:
        self.bus = bus
        self._ended = EndedJobs(bus)

    async def stop(self) -> None:
        await self._ended.stop()

    async def _job(self, method: str, body: dict[str, Any]) -> JobView:
        return convert(await self.bus.scheduler_rpc(method, body), JobView, f"{method} answer")

    async def submit(self, principal: Principal, job: JobRequest) -> JobView:
        body = {"owner": principal.owner, "job": msgspec.to_builtins(job)}
        return await self._job("jobs.submit", body)

    async def get(self, principal: Principal, job_id: str) -> JobView:
        return await self._job("jobs.get", {"owner": reader(principal), "id": job_id})

    async def page(
        self,
        principal: Principal,
        *,
        status: str | None,
        kind: str | None,
        limit: int | None,
        cursor: str | None,
    ) -> JobsPage:
        body = {
            "owner": reader(principal),
            "status": status,
            "kind": kind,
            "limit": limit or 50,
            "cursor": cursor,
        }
        return convert(await self.bus.scheduler_rpc("jobs.list", body), JobsPage, "jobs page")

    async def cancel(self, principal: Principal, job_id: str) -> JobView:
        return await self._job("jobs.cancel", {"owner": reader(principal), "id": job_id})

    async def retry(self, principal: Principal, job_id: str) -> JobView:
        return await self._job("jobs.retry", {"owner": reader(principal), "id": job_id})

    # -- schedules --
    async def _schedule(self, method: str, body: dict[str, Any]) -> ScheduleView:
        answer = await self.bus.scheduler_rpc(method, body)
        return convert(answer, ScheduleView, f"{method} answer")

    async def create_schedule(
        self, principal: Principal, schedule: ScheduleRequest, owner: str
    ) -> ScheduleView:
        """``owner``: the caller's, or (a prompt target) the session's, checked by the caller."""
        del principal  # the owner was derived from it; kept for symmetry with the rest
        body = {"owner": owner, "schedule": msgspec.to_builtins(schedule)}
        return await self._schedule("schedules.create", body)

    async def get_schedule(self, principal: Principal, schedule_id: str) -> ScheduleView:
        return await self._schedule(
            "schedules.get", {"owner": reader(principal), "id": schedule_id}
        )

    async def schedules(
        self, principal: Principal, limit: int | None, cursor: str | None
    ) -> SchedulesPage:
        body = {"owner": reader(principal), "limit": limit or 50, "cursor": cursor}
        answer = await self.bus.scheduler_rpc("schedules.list", body)
        return convert(answer, SchedulesPage, "schedules page")

    async def delete_schedule(self, principal: Principal, schedule_id: str) -> None:
        body = {"owner": reader(principal), "id": schedule_id}
        await self.bus.scheduler_rpc("schedules.delete", body)

    # -- webhooks --
    async def signing_secret(self, principal: Principal) -> SigningSecret:
        """The owner's callback signing secret: a secret, so not for read-only keys."""
        tenancy.authorize(principal, tenancy.JOBS, write=True)
        answer = await self.bus.scheduler_rpc("webhooks.secret", {"owner": principal.owner})
        return convert(answer, SigningSecret, "signing secret")

    async def rotate_signing_secret(self, principal: Principal) -> SigningSecret:
        answer = await self.bus.scheduler_rpc("webhooks.rotate", {"owner": principal.owner})
        return convert(answer, SigningSecret, "signing secret")

    async def run(
        self, principal: Principal, request: JobRequest, wait: float
    ) -> tuple[bool, JobView]:
        """Submit, then wait up to ``wait`` seconds: ``(finished, job)``."""
        job = await self.submit(principal, request)
        if job.status in TERMINAL:
            return True, job
        future = await self._ended.watch(job.id)
        try:
            # Re-read after watching: an end between the submit and the watch is not missed.
            job = await self.get(principal, job.id)
            if job.status in TERMINAL:
                return True, job
            try:
                ended = await asyncio.wait_for(future, min(wait, MAX_RUN_WAIT_S))
            except TimeoutError:
                return False, await self.get(principal, job.id)
            return True, ended
        finally:
            self._ended.forget(job.id, future)
