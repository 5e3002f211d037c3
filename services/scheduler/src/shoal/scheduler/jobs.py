"""The rules of a job's life: pure functions of ``(job, event, now)`` -> new job. No I/O.

A job is ``queued`` (waiting for ``run_at``), ``running`` (attempt ``attempt`` holds a lease
until ``lease_expires_at``), or ended: ``succeeded``, ``cancelled``, ``dead``. Every attempt has a
number; a worker's report names it, and a report for any attempt but the current running one
changes nothing (a late completion from an attempt whose lease ran out and was redriven).

Example::

    job = start_attempt(job, worker="w1", now=now)          # queued -> running, attempt n+1
    job = complete(job, attempt=job.attempt, output={"ok": 1}, now=now)   # -> succeeded
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from shoal.common.clock import iso
from shoal.common.errors import Conflict
from shoal.common.observability import trace_carrier


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    DEAD = "dead"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.DEAD})
LEASE_EXPIRED = "lease expired"
CANCELLED_BY_REQUEST = "cancelled"


@dataclass(frozen=True, slots=True)
class Attempt:
    n: int
    worker: str
    started_at: datetime
    ended_at: datetime | None = None
    error: Any = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": self.n,
            "worker": self.worker,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at) if self.ended_at else None,
        }
        if self.error is not None:
            out["error"] = self.error
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attempt:
        ended = data.get("ended_at")
        return cls(
            n=int(data["n"]),
            worker=str(data["worker"]),
            started_at=datetime.fromisoformat(data["started_at"]),
            ended_at=datetime.fromisoformat(ended) if ended else None,
            error=data.get("error"),
        )


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    owner: str
    kind: str
    status: JobStatus
    input: Any
    created_at: datetime
    updated_at: datetime
    run_at: datetime  # when a queued job may be claimed
    max_attempts: int = 3
    timeout_s: float = 30.0  # how long a worker may hold it without a heartbeat
    idempotency_key: str | None = None
    callback_url: str | None = None
    output: Any = None
    error: Any = None
    attempt: int = 0  # the number of the latest attempt (0: never started)
    attempt_base: int = 0  # attempts before the latest retry: the budget counts from here
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False
    attempts: tuple[Attempt, ...] = ()
    deliveries: tuple[dict[str, Any], ...] = ()
    callback_due_at: datetime | None = None  # a webhook delivery is owed from this time
    schedule_id: str | None = None
    # The W3C trace context of the submit call: attempts and the job's end continue that trace.
    traceparent: str | None = None
    tracestate: str | None = None

    @property
    def trace_headers(self) -> dict[str, str]:
        """The stored trace context as message headers (empty when there is none)."""
        return trace_carrier(self.traceparent, self.tracestate)

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def to_public(self) -> dict[str, Any]:
        """The job as the API shows it."""
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "status": str(self.status),
            "input": self.input,
            "attempts": [a.to_dict() for a in self.attempts],
            "max_attempts": self.max_attempts,
            "timeout": self.timeout_s,
            "run_at": _iso(self.run_at),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }
        if self.status == JobStatus.SUCCEEDED:
            out["output"] = self.output
        if self.error is not None:
            out["error"] = self.error
        if self.idempotency_key is not None:
            out["idempotency_key"] = self.idempotency_key
        if self.callback_url is not None:
            out["callback_url"] = self.callback_url
            out["deliveries"] = list(self.deliveries)
        if self.cancel_requested and not self.ended:
            out["cancel_requested"] = True
        if self.schedule_id is not None:
            out["schedule_id"] = self.schedule_id
        return out


def _iso(at: datetime) -> str:
    return iso(at.timestamp())


def backoff(failures: int, base: timedelta, cap: timedelta) -> timedelta:
    """Delay before the next try after ``failures`` failed attempts: base * 2^(failures-1)."""
    exponent = min(max(failures - 1, 0), 30)
    return min(base * math.pow(2, exponent), cap)


def _end(job: Job, status: JobStatus, now: datetime, **changes: Any) -> Job:
    callback_due = now if job.callback_url else None
    return replace(
        job,
        status=status,
        updated_at=now,
        lease_expires_at=None,
        callback_due_at=callback_due,
        **changes,
    )


def _close_attempt(job: Job, now: datetime, error: Any = None) -> tuple[Attempt, ...]:
    *done, current = job.attempts
    return (*done, replace(current, ended_at=now, error=error))


def start_attempt(job: Job, *, worker: str, now: datetime) -> Job:
    """A worker takes a queued job: attempt n+1 runs, leased for ``timeout_s``."""
    if job.status != JobStatus.QUEUED:
        raise Conflict(f"job is {job.status}, not queued")
    n = job.attempt + 1
    return replace(
        job,
        status=JobStatus.RUNNING,
        attempt=n,
        lease_expires_at=now + timedelta(seconds=job.timeout_s),
        attempts=(*job.attempts, Attempt(n=n, worker=worker, started_at=now)),
        updated_at=now,
    )


def is_current(job: Job, attempt: int) -> bool:
    """Whether a worker's report about ``attempt`` may change the job."""
    return job.status == JobStatus.RUNNING and job.attempt == attempt


def heartbeat(job: Job, *, attempt: int, now: datetime) -> Job | None:
    """Extend the lease of the current attempt; ``None`` if ``attempt`` is not it."""
    if not is_current(job, attempt):
        return None
    return replace(job, lease_expires_at=now + timedelta(seconds=job.timeout_s), updated_at=now)


def complete(job: Job, *, attempt: int, output: Any, now: datetime) -> Job | None:
    """The current attempt succeeded (even after a cancel request: its work is done)."""
    if not is_current(job, attempt):
        return None
    return _end(
        job,
        JobStatus.SUCCEEDED,
        now,
        output=output,
        error=None,
        attempts=_close_attempt(job, now),
    )


def _after_failure(
    job: Job, error: Any, *, retryable: bool, now: datetime, base: timedelta, cap: timedelta
) -> Job:
    attempts = _close_attempt(job, now, error)
    if job.cancel_requested:
        return _end(job, JobStatus.CANCELLED, now, error=error, attempts=attempts)
    used = job.attempt - job.attempt_base
    if not retryable or used >= job.max_attempts:
        return _end(job, JobStatus.DEAD, now, error=error, attempts=attempts)
    return replace(
        job,
        status=JobStatus.QUEUED,
        error=error,
        attempts=attempts,
        lease_expires_at=None,
        run_at=now + backoff(used, base, cap),
        updated_at=now,
    )


def fail(
    job: Job,
    *,
    attempt: int,
    error: Any,
    retryable: bool,
    now: datetime,
    base: timedelta,
    cap: timedelta,
) -> Job | None:
    """The current attempt failed: retry after a backoff, or ``dead`` when the budget is spent
    (or at once when not ``retryable``); ``cancelled`` if a cancel was asked for."""
    if not is_current(job, attempt):
        return None
    return _after_failure(job, error, retryable=retryable, now=now, base=base, cap=cap)


def expire_lease(job: Job, *, now: datetime, cap: timedelta) -> Job | None:
    """A lease ran out (worker gone or silent): redrive at once, or end the job.

    ``None`` when the lease has not run out by ``now``.
    """
    if job.status != JobStatus.RUNNING or job.lease_expires_at is None:
        return None
    if job.lease_expires_at > now:
        return None
    # A redrive is immediate: the worker vanished, the job did not fail.
    return _after_failure(job, LEASE_EXPIRED, retryable=True, now=now, base=timedelta(0), cap=cap)


def cancel(job: Job, *, now: datetime) -> Job:
    """Queued: ``cancelled`` now. Running: ask the worker (``cancel_requested``). Ended:
    ``cancelled`` stays, anything else is a :class:`Conflict`."""
    if job.status == JobStatus.QUEUED:
        return _end(job, JobStatus.CANCELLED, now, error=CANCELLED_BY_REQUEST)
    if job.status == JobStatus.RUNNING:
        return replace(job, cancel_requested=True, updated_at=now)
    if job.status == JobStatus.CANCELLED:
        return job
    raise Conflict(f"job already ended {job.status}", detail={"status": str(job.status)})


def retry(job: Job, *, now: datetime) -> Job:
    """Put a ``dead`` or ``cancelled`` job back in the queue with a fresh attempt budget."""
    if job.status not in (JobStatus.DEAD, JobStatus.CANCELLED):
        raise Conflict(
            f"only a dead or cancelled job can be retried; this one is {job.status}",
            detail={"status": str(job.status)},
        )
    return replace(
        job,
        status=JobStatus.QUEUED,
        attempt_base=job.attempt,
        cancel_requested=False,
        error=None,
        run_at=now,
        callback_due_at=None,
        updated_at=now,
    )
