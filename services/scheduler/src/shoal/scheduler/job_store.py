"""All SQL of jobs: the ``jobs`` table, row locks, and ``SKIP LOCKED`` claims.

Every change to a job is read-modify-write under a row lock: the caller passes a pure rule
(``Job -> Job | None``) and the store applies it inside the transaction, so two replicas or two
reports about one job never interleave.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from shoal.common.storage import DatabaseClient
from shoal.scheduler.jobs import Attempt, Job, JobStatus

metadata = sa.MetaData()

# Mirrors migrations/0002_jobs.py; the migration, not this table, creates the schema.
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("input", postgresql.JSONB(none_as_null=False)),
    sa.Column("output", postgresql.JSONB(none_as_null=False)),
    sa.Column("error", postgresql.JSONB(none_as_null=False)),
    sa.Column("idempotency_key", sa.Text),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("timeout_s", sa.Float, nullable=False),
    sa.Column("callback_url", sa.Text),
    sa.Column("run_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("attempt_base", sa.Integer, nullable=False),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("attempts", postgresql.JSONB, nullable=False),
    sa.Column("deliveries", postgresql.JSONB, nullable=False),
    sa.Column("callback_due_at", sa.DateTime(timezone=True)),
    sa.Column("schedule_id", sa.Text),
    sa.Column("traceparent", sa.Text),  # migrations/0006
    sa.Column("tracestate", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

Rule = Callable[[Job], "Job | None"]


def _row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "owner": job.owner,
        "kind": job.kind,
        "status": str(job.status),
        "input": job.input,
        "output": job.output,
        "error": job.error,
        "idempotency_key": job.idempotency_key,
        "max_attempts": job.max_attempts,
        "timeout_s": job.timeout_s,
        "callback_url": job.callback_url,
        "run_at": job.run_at,
        "attempt": job.attempt,
        "attempt_base": job.attempt_base,
        "lease_expires_at": job.lease_expires_at,
        "cancel_requested": job.cancel_requested,
        "attempts": [a.to_dict() for a in job.attempts],
        "deliveries": list(job.deliveries),
        "callback_due_at": job.callback_due_at,
        "schedule_id": job.schedule_id,
        "traceparent": job.traceparent,
        "tracestate": job.tracestate,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }


def _job(row: sa.RowMapping) -> Job:
    return Job(
        id=row["id"],
        owner=row["owner"],
        kind=row["kind"],
        status=JobStatus(row["status"]),
        input=row["input"],
        output=row["output"],
        error=row["error"],
        idempotency_key=row["idempotency_key"],
        max_attempts=row["max_attempts"],
        timeout_s=row["timeout_s"],
        callback_url=row["callback_url"],
        run_at=row["run_at"],
        attempt=row["attempt"],
        attempt_base=row["attempt_base"],
        lease_expires_at=row["lease_expires_at"],
        cancel_requested=row["cancel_requested"],
        attempts=tuple(Attempt.from_dict(a) for a in row["attempts"]),
        deliveries=tuple(row["deliveries"]),
        callback_due_at=row["callback_due_at"],
        schedule_id=row["schedule_id"],
        traceparent=row["traceparent"],
        tracestate=row["tracestate"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def insert_job(session: AsyncSession, job: Job) -> tuple[Job, bool]:
    """Insert ``job`` in an open transaction; an existing job of the same owner and
    idempotency key wins. Returns the stored job and whether it is new."""
    stmt = (
        postgresql.insert(jobs)
        .values(**_row(job))
        .on_conflict_do_nothing(
            index_elements=[jobs.c.owner, jobs.c.idempotency_key],
            index_where=jobs.c.idempotency_key.isnot(None),
        )
        .returning(jobs.c.id)
    )
    inserted = (await session.execute(stmt)).first()
    if inserted is not None:
        return job, True
    existing = await session.execute(
        sa.select(jobs).where(
            jobs.c.owner == job.owner, jobs.c.idempotency_key == job.idempotency_key
        )
    )
    return _job(existing.mappings().one()), False


class JobStore:
    def __init__(self, db: DatabaseClient) -> None:
        self._db = db

    async def insert(self, job: Job) -> tuple[Job, bool]:
        async with self._db.session() as session, session.begin():
            return await insert_job(session, job)

    async def get(self, job_id: str) -> Job | None:
        async with self._db.session() as session:
            result = await session.execute(sa.select(jobs).where(jobs.c.id == job_id))
            row = result.mappings().first()
        return _job(row) if row is not None else None

    async def page(
        self,
        owner: str | None,
        *,
        status: str | None,
        kind: str | None,
        limit: int,
        before: str | None,
    ) -> list[Job]:
        """Newest first (ids sort by creation time); ``before`` is the last id of a page."""
        query = sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        if status is not None:
            query = query.where(jobs.c.status == status)
        if kind is not None:
            query = query.where(jobs.c.kind == kind)
        if before is not None:
            query = query.where(jobs.c.id < before)
        async with self._db.session() as session:
            result = await session.execute(query)
            return [_job(row) for row in result.mappings().all()]

    async def update(self, job_id: str, rule: Rule) -> tuple[Job | None, Job | None]:
        """Apply ``rule`` to the locked job; store what it returns. ``(before, after)``:
        ``before`` is None if there is no such job, ``after`` None if the rule declined."""
        async with self._db.session() as session, session.begin():
            result = await session.execute(
                sa.select(jobs).where(jobs.c.id == job_id).with_for_update()
            )
            row = result.mappings().first()
            if row is None:
                return None, None
            before = _job(row)
            after = rule(before)
            if after is not None and after != before:
                await _write(session, after)
            return before, after

    async def claim(
        self,
        *,
        kinds: Sequence[str],
        owner: str | None,
        now: datetime,
        limit: int,
        rule: Callable[[Job], Job],
    ) -> list[Job]:
        """Start up to ``limit`` due queued jobs of ``kinds`` (of ``owner``, or anyone's).

        ``SKIP LOCKED``: concurrent claims (other sockets, other replicas) take disjoint jobs.
        """
        query = (
            sa.select(jobs)
            .where(
                jobs.c.status == JobStatus.QUEUED.value,
                jobs.c.kind.in_(list(kinds)),
                jobs.c.run_at <= now,
            )
            .order_by(jobs.c.run_at, jobs.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        async with self._db.session() as session, session.begin():
            result = await session.execute(query)
            started = [rule(_job(row)) for row in result.mappings().all()]
            for job in started:
                await _write(session, job)
        return started

    async def sweep(
        self, condition: sa.ColumnElement[bool], *, limit: int, rule: Rule
    ) -> list[tuple[Job, Job]]:
        """Apply ``rule`` to up to ``limit`` rows matching ``condition`` (``SKIP LOCKED``)."""
        query = sa.select(jobs).where(condition).limit(limit).with_for_update(skip_locked=True)
        changed: list[tuple[Job, Job]] = []
        async with self._db.session() as session, session.begin():
            result = await session.execute(query)
            for row in result.mappings().all():
                before = _job(row)
                after = rule(before)
                if after is not None and after != before:
                    await _write(session, after)
                    changed.append((before, after))
        return changed


async def _write(session: AsyncSession, job: Job) -> None:
    values = _row(job)
    del values["id"]
    await session.execute(sa.update(jobs).where(jobs.c.id == job.id).values(**values))


def expired_leases(now: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(jobs.c.status == JobStatus.RUNNING.value, jobs.c.lease_expires_at <= now)


def callbacks_due(now: datetime) -> sa.ColumnElement[bool]:
    return jobs.c.callback_due_at <= now
