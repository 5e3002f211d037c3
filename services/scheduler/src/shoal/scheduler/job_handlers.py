"""The jobs edge of the scheduler (transport only): the ``jobs.*`` RPCs and the broadcasts.

RPCs (``rpc("scheduler", method)``, queue group ``scheduler``), ``owner`` null = an admin:
- ``jobs.submit`` ``{owner, job: {kind, input, …}}`` -> the job
- ``jobs.get`` / ``jobs.cancel`` / ``jobs.retry`` ``{owner, id}`` -> the job
- ``jobs.list`` ``{owner, status?, kind?, limit?, cursor?}`` -> ``{jobs, next}``
- ``jobs.claim`` ``{kinds, owner, worker, limit}`` -> ``{jobs: [offer]}`` (an offer carries
  the submit call's ``traceparent``/``tracestate`` when it had one)
- ``jobs.heartbeat`` ``{job_id, attempt}`` -> ``{ok, cancel}``
- ``jobs.complete`` ``{job_id, attempt, output}`` / ``jobs.fail`` ``{job_id, attempt, error,
  retryable?}`` -> ``{accepted}`` (false: the attempt is no longer the running one)

Broadcasts (core NATS, best effort; workers also poll): ``bcast.jobs.ready.<kind>``,
``bcast.jobs.cancel`` ``{job_id}``, ``bcast.jobs.ended.<job_id>`` ``{job}``.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from shoal.common.clock import iso
from shoal.common.errors import BadRequest
from shoal.common.messaging import Subjects, dumps, serve
from shoal.common.messaging.rpc import Handler
from shoal.scheduler.job_service import JobService
from shoal.scheduler.jobs import Job

QUEUE = "scheduler"


def offer(job: Job) -> dict[str, Any]:
    """What a worker is sent for one attempt (the socket's ``job`` frame, without ``type``),
    with the submitter's trace context so the attempt continues its trace."""
    assert job.lease_expires_at is not None  # a started attempt holds a lease
    return {
        "job_id": job.id,
        "kind": job.kind,
        "input": job.input,
        "attempt": job.attempt,
        "timeout": job.timeout_s,
        "lease_expires_at": iso(job.lease_expires_at.timestamp()),
        **job.trace_headers,
    }


class NatsJobSignals:
    """:class:`~shoal.scheduler.job_service.JobSignals` as core-NATS broadcasts."""

    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        self._nc = nc
        self._subjects = subjects

    async def _publish(self, topic: str, body: dict[str, Any]) -> None:
        try:
            await self._nc.publish(self._subjects.broadcast(topic), dumps(body))
        except NatsError:
            pass  # best effort: workers poll, waiters re-read the job

    async def ready(self, kind: str) -> None:
        await self._publish(f"jobs.ready.{kind}", {"kind": kind})

    async def cancel(self, job_id: str) -> None:
        await self._publish("jobs.cancel", {"job_id": job_id})

    async def ended(self, job: Job) -> None:
        await self._publish(f"jobs.ended.{job.id}", {"job": job.to_public(), "owner": job.owner})


def _owner(body: dict[str, Any]) -> str | None:
    owner = body.get("owner")
    if owner is not None and not isinstance(owner, str):
        raise BadRequest("owner must be a string or null")
    return owner


def _str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    return value


def _int(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{name} must be an integer")
    return value


async def serve_concurrently(
    nc: NATS, subject: str, handler: Handler, concurrency: int
) -> list[Subscription]:
    """``concurrency`` members of the queue group on ``subject`` in this process.

    nats-py runs one subscription's callbacks one after another; the server spreads a queue
    group's requests over its members, so N members answer up to N requests at once.
    """
    return [await serve(nc, subject, QUEUE, handler) for _ in range(concurrency)]


async def serve_jobs(
    nc: NATS, subjects: Subjects, service: JobService, *, concurrency: int = 1
) -> list[Subscription]:
    """Answer the ``jobs.*`` RPCs (see the module docstring)."""

    async def submit(body: dict[str, Any]) -> Any:
        job = body.get("job")
        if not isinstance(job, dict):
            raise BadRequest("body must be a JSON object")
        return (await service.submit(_str(body, "owner"), job)).to_public()

    async def get(body: dict[str, Any]) -> Any:
        return (await service.get(_owner(body), _str(body, "id"))).to_public()

    async def list_jobs(body: dict[str, Any]) -> Any:
        limit = body.get("limit")
        page, cursor = await service.page(
            _owner(body),
            status=body.get("status"),
            kind=body.get("kind"),
            limit=limit if isinstance(limit, int) else 50,
            cursor=body.get("cursor"),
        )
        return {"jobs": [job.to_public() for job in page], "next": cursor}

    async def cancel(body: dict[str, Any]) -> Any:
        return (await service.cancel(_owner(body), _str(body, "id"))).to_public()

    async def retry(body: dict[str, Any]) -> Any:
        return (await service.retry(_owner(body), _str(body, "id"))).to_public()

    async def claim(body: dict[str, Any]) -> Any:
        kinds = body.get("kinds")
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise BadRequest("kinds must be a list of strings")
        started = await service.claim(
            kinds=kinds, owner=_owner(body), worker=_str(body, "worker"), limit=_int(body, "limit")
        )
        return {"jobs": [offer(job) for job in started]}

    async def heartbeat(body: dict[str, Any]) -> Any:
        job = await service.heartbeat(_str(body, "job_id"), _int(body, "attempt"))
        return {"ok": job is not None, "cancel": bool(job and job.cancel_requested)}

    async def complete(body: dict[str, Any]) -> Any:
        job = await service.complete(
            _str(body, "job_id"), _int(body, "attempt"), body.get("output")
        )
        return {"accepted": job is not None}

    async def fail(body: dict[str, Any]) -> Any:
        retryable = body.get("retryable", True)
        if not isinstance(retryable, bool):
            raise BadRequest("retryable must be a boolean")
        job = await service.fail(
            _str(body, "job_id"), _int(body, "attempt"), body.get("error"), retryable=retryable
        )
        return {"accepted": job is not None}

    routes = {
        "jobs.submit": submit,
        "jobs.get": get,
        "jobs.list": list_jobs,
        "jobs.cancel": cancel,
        "jobs.retry": retry,
        "jobs.claim": claim,
        "jobs.heartbeat": heartbeat,
        "jobs.complete": complete,
        "jobs.fail": fail,
    }
    subscriptions: list[Subscription] = []
    for method, handler in routes.items():
        subject = subjects.rpc("scheduler", method)
        subscriptions += await serve_concurrently(nc, subject, handler, concurrency)
    return subscriptions
