"""Jobs: validation, owners, and the calls that apply :mod:`shoal.scheduler.jobs` rules through
the store. No transport: what other processes must hear (a job is ready, a running job is to be
cancelled, a job ended) goes through the :class:`JobSignals` the edge provides.

Example::

    job = await service.submit("alice", {"kind": "resize", "input": {"w": 64}})
    [offer] = await service.claim(kinds=["resize"], owner=None, worker="w1", limit=1)
    await service.complete(offer.id, attempt=offer.attempt, output={"url": "…"})
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from shoal.common.clock import Clock
from shoal.common.errors import BadRequest, NotFound, PayloadTooLarge
from shoal.common.messaging import dumps, is_token, new_id
from shoal.common.observability import inject_trace, recording, start_span, trace_id_of
from shoal.scheduler import jobs as rules
from shoal.scheduler.job_store import JobStore, Rule, expired_leases
from shoal.scheduler.jobs import Job, JobStatus
from shoal.scheduler.metrics import JOBS_DEAD, JOBS_ENDED

log = logging.getLogger(__name__)

MAX_ATTEMPTS_LIMIT = 20
MAX_TIMEOUT_S = 3600.0
MAX_IDEMPOTENCY_KEY_CHARS = 200
MAX_ERROR_BYTES = 16 * 1024
MAX_LIST_LIMIT = 200
SUBMIT_FIELDS = frozenset(
    {"kind", "input", "run_at", "idempotency_key", "max_attempts", "timeout", "callback_url"}
)


class JobSignals(Protocol):
    """What other processes hear about jobs (core NATS broadcasts in production)."""

    async def ready(self, kind: str) -> None:
        """A job of ``kind`` may be claimed now."""
        ...

    async def cancel(self, job_id: str) -> None:
        """The worker running ``job_id`` should stop."""
        ...

    async def ended(self, job: Job) -> None:
        """``job`` reached a terminal status."""
        ...


def parse_time(value: object, name: str) -> datetime:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be an RFC 3339 time")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise BadRequest(f"{name} must be an RFC 3339 time") from exc
    if parsed.tzinfo is None:
        raise BadRequest(f"{name} must carry a time zone (e.g. Z)")
    return parsed.astimezone(UTC)


def check_kind(kind: object) -> str:
    if not isinstance(kind, str) or not is_token(kind):
        raise BadRequest("kind must be 1..128 characters of A-Z a-z 0-9 _ -")
    return kind


def check_size(value: Any, name: str, limit: int) -> None:
    size = len(dumps(value))
    if size > limit:
        raise PayloadTooLarge(
            f"{name} is at most {limit} bytes as JSON", detail={"max_bytes": limit, "bytes": size}
        )


def _error_value(error: Any) -> Any:
    """What a worker reported, bounded: an oversize error is kept as its truncated text."""
    if len(dumps(error)) <= MAX_ERROR_BYTES:
        return error
    return dumps(error)[:MAX_ERROR_BYTES].decode(errors="replace")


class JobService:
    def __init__(
        self,
        store: JobStore,
        signals: JobSignals,
        clock: Clock,
        *,
        max_input_bytes: int,
        backoff_base: timedelta,
        backoff_max: timedelta,
        check_callback_url: Any = None,
    ) -> None:
        self._store = store
        self._signals = signals
        self._clock = clock
        self._max_input_bytes = max_input_bytes
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._check_callback_url = check_callback_url or (lambda url: url)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.now(), tz=UTC)

    # -- what owners do --
    def new_job(self, owner: str, body: dict[str, Any], *, schedule_id: str | None = None) -> Job:
        """Validate a submission (the API's body) into a queued job; nothing is stored."""
        unknown = sorted(set(body) - SUBMIT_FIELDS)
        if unknown:
            raise BadRequest(f"unknown fields: {', '.join(unknown)}", detail={"unknown": unknown})
        kind = check_kind(body.get("kind"))
        payload = body.get("input")
        check_size(payload, "input", self._max_input_bytes)
        max_attempts = body.get("max_attempts", 3)
        if (
            not isinstance(max_attempts, int)
            or isinstance(max_attempts, bool)
            or not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT
        ):
            raise BadRequest(f"max_attempts must be an integer from 1 to {MAX_ATTEMPTS_LIMIT}")
        timeout = body.get("timeout", 30)
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 1 <= timeout <= MAX_TIMEOUT_S
        ):
            raise BadRequest(f"timeout must be a number of seconds from 1 to {MAX_TIMEOUT_S:.0f}")
        key = body.get("idempotency_key")
        if key is not None and (
            not isinstance(key, str) or not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS
        ):
            raise BadRequest(
                f"idempotency_key must be a string of 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"
            )
        callback_url = body.get("callback_url")
        if callback_url is not None:
            callback_url = self._check_callback_url(callback_url)
        now = self.now()
        run_at = parse_time(body["run_at"], "run_at") if body.get("run_at") is not None else now
        trace = inject_trace({})  # the submit call's: the job's attempts and end continue it
        return Job(
            id=new_id("job"),
            owner=owner,
            kind=kind,
            status=JobStatus.QUEUED,
            input=payload,
            created_at=now,
            updated_at=now,
            run_at=max(run_at, now),
            max_attempts=max_attempts,
            timeout_s=float(timeout),
            idempotency_key=key,
            callback_url=callback_url,
            schedule_id=schedule_id,
            traceparent=trace.get("traceparent"),
            tracestate=trace.get("tracestate"),
        )

    async def submit(self, owner: str, body: dict[str, Any]) -> Job:
        """Queue a job; the same ``idempotency_key`` of the same owner returns the first job."""
        job, created = await self._store.insert(self.new_job(owner, body))
        if created and job.run_at <= self.now():
            await self._signals.ready(job.kind)
        return job

    async def get(self, owner: str | None, job_id: str) -> Job:
        """The job, if ``owner`` (None: an admin, any owner) may see it; else 404."""
        job = await self._store.get(job_id) if is_token(job_id) else None
        if job is None or (owner is not None and job.owner != owner):
            raise NotFound("job not found", detail={"job_id": job_id})
        return job

    async def page(
        self,
        owner: str | None,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """A page, newest first, and the cursor of the next (None: no more)."""
        if status is not None and status not in JobStatus.__members__.values():
            raise BadRequest("status must be one of " + ", ".join(s.value for s in JobStatus))
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise BadRequest(f"limit must be from 1 to {MAX_LIST_LIMIT}")
        if cursor is not None and not is_token(cursor):
            raise BadRequest("cursor must be a page's next")
        page = await self._store.page(
            owner, status=status, kind=kind, limit=limit + 1, before=cursor
        )
        more = len(page) > limit
        page = page[:limit]
        return page, page[-1].id if more else None

    async def _owned_update(self, owner: str | None, job_id: str, rule: Rule) -> Job:
        before, after = await self._owned_change(owner, job_id, rule)
        return after or before

    async def _owned_change(
        self, owner: str | None, job_id: str, rule: Rule
    ) -> tuple[Job, Job | None]:
        """The job before ``rule`` and after it (``None``: the rule changed nothing)."""

        def guarded(job: Job) -> Job | None:
            if owner is not None and job.owner != owner:
                return None
            return rule(job)

        before: Job | None = None
        after: Job | None = None
        if is_token(job_id):
            before, after = await self._store.update(job_id, guarded)
        if before is None or (owner is not None and before.owner != owner):
            raise NotFound("job not found", detail={"job_id": job_id})
        return before, after

    async def cancel(self, owner: str | None, job_id: str) -> Job:
        """Queued: cancelled now. Running: the worker is told; it ends cancelled when the
        worker stops or its lease runs out, unless its completion wins."""
        now = self.now()
        before, after = await self._owned_change(owner, job_id, lambda j: rules.cancel(j, now=now))
        job = after or before
        if job.status == JobStatus.RUNNING:
            await self._signals.cancel(job.id)
        elif job.status == JobStatus.CANCELLED and before.status != JobStatus.CANCELLED:
            # A queued job ends here: in its own trace, like every other ending.
            with start_span("scheduler.job_end", job_trace(job), **_job_attributes(job)):
                _count_end(job)
                await self._signals.ended(job)
        elif job.status == JobStatus.CANCELLED:
            await self._signals.ended(job)
        return job

    async def retry(self, owner: str | None, job_id: str) -> Job:
        """A dead or cancelled job goes back in the queue with a fresh attempt budget."""
        now = self.now()
        job = await self._owned_update(owner, job_id, lambda j: rules.retry(j, now=now))
        await self._signals.ready(job.kind)
        return job

    # -- what workers do --
    async def claim(
        self, *, kinds: list[str], owner: str | None, worker: str, limit: int
    ) -> list[Job]:
        """Start up to ``limit`` due jobs of ``kinds`` for ``worker`` (leased)."""
        if not kinds or len(kinds) > 32:
            raise BadRequest("kinds must name 1 to 32 kinds")
        for kind in kinds:
            check_kind(kind)
        if not 1 <= limit <= 1000:
            raise BadRequest("limit must be from 1 to 1000")
        now = self.now()
        started = await self._store.claim(
            kinds=kinds,
            owner=owner,
            now=now,
            limit=limit,
            rule=lambda job: rules.start_attempt(job, worker=worker, now=now),
        )
        # One claim starts jobs of many traces: each start is a span in its own job's trace
        # (a mark with nothing inside: made only when spans are recorded).
        if recording():
            for job in started:
                with start_span("scheduler.job_start", job_trace(job), **_job_attributes(job)):
                    pass
        return started

    async def heartbeat(self, job_id: str, attempt: int) -> Job | None:
        """Extend the lease; ``None`` when the attempt is no longer the running one."""
        now = self.now()
        _, after = await self._store.update(
            job_id, lambda j: rules.heartbeat(j, attempt=attempt, now=now)
        )
        return after

    async def complete(self, job_id: str, attempt: int, output: Any) -> Job | None:
        """Record the result; ``None`` (nothing changed) for a stale attempt."""
        check_size(output, "output", self._max_input_bytes)
        now = self.now()
        _, after = await self._store.update(
            job_id, lambda j: rules.complete(j, attempt=attempt, output=output, now=now)
        )
        if after is not None:
            with start_span("scheduler.job_end", job_trace(after), **_job_attributes(after)):
                _count_end(after)
                await self._signals.ended(after)
        return after

    async def fail(
        self, job_id: str, attempt: int, error: Any, *, retryable: bool = True
    ) -> Job | None:
        """Record a failed attempt: retried after a backoff, or dead; ``None`` if stale."""
        now = self.now()
        _, after = await self._store.update(
            job_id,
            lambda j: rules.fail(
                j,
                attempt=attempt,
                error=_error_value(error),
                retryable=retryable,
                now=now,
                base=self._backoff_base,
                cap=self._backoff_max,
            ),
        )
        if after is not None:
            await self._after_change(after)
        return after

    async def signal_ready(self, kind: str) -> None:
        """Tell workers a job of ``kind`` may be claimed (after a commit that queued one)."""
        await self._signals.ready(kind)

    # -- what the loop does --
    async def expire_leases(self, limit: int = 500) -> int:
        """Redrive (or end) every running job whose lease ran out; how many there were."""
        now = self.now()
        changed = await self._store.sweep(
            expired_leases(now),
            limit=limit,
            rule=lambda j: rules.expire_lease(j, now=now, cap=self._backoff_max),
        )
        for _, after in changed:
            log.info(
                "job lease expired",
                extra={"job_id": after.id, "attempt": after.attempt, "status": str(after.status)},
            )
            await self._after_change(after)
        return len(changed)

    async def _after_change(self, job: Job) -> None:
        # A failure or an expired lease ends the attempt: a span in the job's trace, whatever
        # called (a worker's report, or the lease sweep, which has no trace of its own).
        name = "scheduler.job_end" if job.ended else "scheduler.job_retry"
        with start_span(name, job_trace(job), **_job_attributes(job)):
            if job.ended:
                _count_end(job)
                await self._signals.ended(job)
            elif job.status == JobStatus.QUEUED and job.run_at <= self.now():
                await self._signals.ready(job.kind)


def job_trace(job: Job) -> dict[str, str]:
    """The trace context a span about ``job`` continues: the current one when it is already in
    the job's trace (a worker's report relayed with it), else the one stored at submit (else
    the current one: a job submitted outside a trace)."""
    current = inject_trace({})
    stored = job.trace_headers
    if not stored or trace_id_of(current) == trace_id_of(stored):
        return current
    return stored


def _job_attributes(job: Job) -> dict[str, Any]:
    return {
        "shoal.job_id": job.id,
        "shoal.job_attempt": job.attempt,
        "shoal.job_status": str(job.status),
    }


def _count_end(job: Job) -> None:
    """Count a job that just reached its terminal status (once: callers pass only changes)."""
    JOBS_ENDED.labels(kind=job.kind, outcome=str(job.status)).inc()
    if job.status == JobStatus.DEAD:
        JOBS_DEAD.labels(kind=job.kind).inc()
