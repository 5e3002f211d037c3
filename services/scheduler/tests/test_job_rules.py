"""The job state machine as pure rules: no I/O, time passed in."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from shoal.common.errors import Conflict
from shoal.scheduler import jobs as rules
from shoal.scheduler.jobs import Job, JobStatus

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BASE, CAP = timedelta(seconds=1), timedelta(seconds=60)


def queued(**changes: object) -> Job:
    job = Job(
        id="job_1",
        owner="alice",
        kind="resize",
        status=JobStatus.QUEUED,
        input={"w": 1},
        created_at=T0,
        updated_at=T0,
        run_at=T0,
        timeout_s=10,
    )
    return replace(job, **changes)  # type: ignore[arg-type]


def test_an_attempt_leases_the_job_and_a_heartbeat_extends_it() -> None:
    job = rules.start_attempt(queued(), worker="w1", now=T0)
    assert (job.status, job.attempt, job.lease_expires_at) == (
        JobStatus.RUNNING,
        1,
        T0 + timedelta(seconds=10),
    )
    later = T0 + timedelta(seconds=8)
    beat = rules.heartbeat(job, attempt=1, now=later)
    assert beat is not None
    assert beat.lease_expires_at == later + timedelta(seconds=10)
    assert rules.heartbeat(job, attempt=2, now=later) is None
    with pytest.raises(Conflict):
        rules.start_attempt(job, worker="w2", now=T0)


def test_a_late_completion_from_a_redriven_attempt_changes_nothing() -> None:
    first = rules.start_attempt(queued(), worker="w1", now=T0)
    assert rules.expire_lease(first, now=T0 + timedelta(seconds=9), cap=CAP) is None
    redriven = rules.expire_lease(first, now=T0 + timedelta(seconds=10), cap=CAP)
    assert redriven is not None
    assert redriven.status == JobStatus.QUEUED
    assert redriven.attempts[0].error == rules.LEASE_EXPIRED
    second = rules.start_attempt(redriven, worker="w2", now=T0 + timedelta(seconds=11))
    done = rules.complete(second, attempt=2, output="two", now=T0 + timedelta(seconds=12))
    assert done is not None
    assert done.status == JobStatus.SUCCEEDED
    assert done.output == "two"
    assert rules.complete(done, attempt=1, output="one", now=T0 + timedelta(seconds=13)) is None
    assert rules.complete(second, attempt=1, output="one", now=T0) is None


def test_failures_back_off_exponentially_then_the_job_is_dead_and_retry_revives_it() -> None:
    job = queued(max_attempts=3)
    now = T0
    delays = []
    for n in (1, 2):
        job = rules.start_attempt(job, worker="w", now=now)
        failed = rules.fail(
            job, attempt=n, error="boom", retryable=True, now=now, base=BASE, cap=CAP
        )
        assert failed is not None
        assert failed.status == JobStatus.QUEUED
        delays.append((failed.run_at - now).total_seconds())
        job, now = failed, failed.run_at
    assert delays == [1.0, 2.0]
    job = rules.start_attempt(job, worker="w", now=now)
    dead = rules.fail(job, attempt=3, error="last", retryable=True, now=now, base=BASE, cap=CAP)
    assert dead is not None
    assert dead.status == JobStatus.DEAD
    assert dead.error == "last"
    revived = rules.retry(dead, now=now)
    assert revived.status == JobStatus.QUEUED
    assert revived.attempt_base == 3
    again = rules.start_attempt(revived, worker="w", now=now)
    assert again.attempt == 4
    # A fresh budget: the fourth attempt's failure is retried.
    failed = rules.fail(again, attempt=4, error="x", retryable=True, now=now, base=BASE, cap=CAP)
    assert failed is not None
    assert failed.status == JobStatus.QUEUED


def test_a_non_retryable_failure_is_dead_at_once() -> None:
    job = rules.start_attempt(queued(), worker="w", now=T0)
    dead = rules.fail(job, attempt=1, error="bad", retryable=False, now=T0, base=BASE, cap=CAP)
    assert dead is not None
    assert dead.status == JobStatus.DEAD


def test_cancel_ends_a_queued_job_and_asks_a_running_one() -> None:
    assert rules.cancel(queued(), now=T0).status == JobStatus.CANCELLED
    running = rules.start_attempt(queued(), worker="w", now=T0)
    asked = rules.cancel(running, now=T0)
    assert asked.status == JobStatus.RUNNING
    assert asked.cancel_requested
    stopped = rules.fail(
        asked, attempt=1, error="stopped", retryable=True, now=T0, base=BASE, cap=CAP
    )
    assert stopped is not None
    assert stopped.status == JobStatus.CANCELLED
    expired = rules.expire_lease(asked, now=T0 + timedelta(seconds=10), cap=CAP)
    assert expired is not None
    assert expired.status == JobStatus.CANCELLED
    # The completion wins if it comes first.
    won = rules.complete(asked, attempt=1, output=1, now=T0)
    assert won is not None
    assert won.status == JobStatus.SUCCEEDED
    with pytest.raises(Conflict):
        rules.cancel(won, now=T0)
    with pytest.raises(Conflict):
        rules.retry(won, now=T0)


def test_a_terminal_job_with_a_callback_owes_a_delivery() -> None:
    job = rules.start_attempt(queued(callback_url="https://example.com/hook"), worker="w", now=T0)
    done = rules.complete(job, attempt=1, output=1, now=T0)
    assert done is not None
    assert done.callback_due_at == T0


def test_backoff_is_capped() -> None:
    assert rules.backoff(40, BASE, CAP) == CAP
    assert rules.backoff(1, BASE, CAP) == BASE
