"""Jobs through the scheduler's RPCs against real PostgreSQL and NATS, the clock injected."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY
from pydantic import SecretStr

from shoal.common.clock import ManualClock
from shoal.common.errors import BadRequest, Conflict, NotFound, PayloadTooLarge
from shoal.common.messaging import Subjects, loads, new_id, request
from shoal.common.observability import start_span, trace_id_of
from shoal.scheduler.app import create_app
from shoal.scheduler.config import SchedulerSettings


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=time.time())


@pytest.fixture
def settings(nats_url: str, database_url: str, subject_prefix: str) -> SchedulerSettings:
    return SchedulerSettings(
        environment="test",
        nats_url=nats_url,
        database_url=SecretStr(database_url),
        subject_prefix=subject_prefix,
        log_json=False,
        scheduler_poll_interval=timedelta(milliseconds=50),
        scheduler_sweep_interval=timedelta(milliseconds=50),
        scheduler_job_max_input_bytes=4096,
    )


@pytest.fixture
async def scheduler_app(settings: SchedulerSettings, clock: ManualClock) -> AsyncIterator[FastAPI]:
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
def rpc(nc: NATS, subject_prefix: str) -> Any:
    subjects = Subjects(subject_prefix)

    async def call(method: str, **body: Any) -> Any:
        return await request(nc, subjects.rpc("scheduler", method), body)

    return call


pytestmark = pytest.mark.usefixtures("scheduler_app")


async def test_submit_is_idempotent_per_owner_and_refuses_bad_input(rpc: Any) -> None:
    job = await rpc("jobs.submit", owner="alice", job={"kind": "k", "input": {"a": 1}})
    assert job["status"] == "queued"
    assert job["input"] == {"a": 1}
    assert job["attempts"] == []
    body = {"kind": "k", "input": 1, "idempotency_key": "once"}
    first = await rpc("jobs.submit", owner="alice", job=body)
    assert (await rpc("jobs.submit", owner="alice", job=body))["id"] == first["id"]
    assert (await rpc("jobs.submit", owner="bob", job=body))["id"] != first["id"]

    for bad in (
        {"kind": "k", "surprise": 1},
        {"kind": "a.b"},
        {"kind": "k", "max_attempts": 0},
        {"kind": "k", "max_attempts": 21},
        {"kind": "k", "timeout": 0},
        {"kind": "k", "run_at": "tomorrow"},
        {"kind": "k", "run_at": "2030-01-01T00:00:00"},
    ):
        with pytest.raises(BadRequest):
            await rpc("jobs.submit", owner="alice", job=bad)
    with pytest.raises(PayloadTooLarge):
        await rpc("jobs.submit", owner="alice", job={"kind": "k", "input": "x" * 5000})
    page = await rpc("jobs.list", owner="alice")
    assert len(page["jobs"]) == 2
    assert page["next"] is None


async def test_another_owners_job_is_not_found(rpc: Any) -> None:
    job = await rpc("jobs.submit", owner="alice", job={"kind": "k"})
    for method in ("jobs.get", "jobs.cancel", "jobs.retry"):
        with pytest.raises(NotFound):
            await rpc(method, owner="bob", id=job["id"])
    assert (await rpc("jobs.get", owner=None, id=job["id"]))["id"] == job["id"]  # admin
    assert (await rpc("jobs.list", owner="bob"))["jobs"] == []


async def test_a_claimed_job_completes_once_and_a_stale_report_is_refused(
    rpc: Any, clock: ManualClock, nc: NATS, subject_prefix: str
) -> None:
    subjects = Subjects(subject_prefix)
    ended = await nc.subscribe(subjects.broadcast("jobs.ended.*"))
    job = await rpc("jobs.submit", owner="alice", job={"kind": "k", "input": 7, "timeout": 5})
    assert (await rpc("jobs.claim", kinds=["other"], owner=None, worker="w1", limit=5)) == {
        "jobs": []
    }
    (offer,) = (await rpc("jobs.claim", kinds=["k"], owner="alice", worker="w1", limit=5))["jobs"]
    assert (offer["job_id"], offer["attempt"], offer["input"]) == (job["id"], 1, 7)
    assert (await rpc("jobs.claim", kinds=["k"], owner=None, worker="w2", limit=5))["jobs"] == []

    # The lease runs out: the sweep redrives it, and another worker takes attempt 2.
    ready = await nc.subscribe(subjects.broadcast("jobs.ready.k"))
    clock.advance(6)
    await ready.next_msg(timeout=5)
    await ready.unsubscribe()
    assert (await rpc("jobs.get", owner="alice", id=job["id"]))["status"] == "queued"
    (second,) = (await rpc("jobs.claim", kinds=["k"], owner=None, worker="w2", limit=1))["jobs"]
    assert second["attempt"] == 2
    assert await rpc("jobs.heartbeat", job_id=job["id"], attempt=1) == {
        "ok": False,
        "cancel": False,
    }
    assert await rpc("jobs.heartbeat", job_id=job["id"], attempt=2) == {"ok": True, "cancel": False}
    assert await rpc("jobs.complete", job_id=job["id"], attempt=2, output="two") == {
        "accepted": True
    }
    assert await rpc("jobs.complete", job_id=job["id"], attempt=1, output="one") == {
        "accepted": False
    }
    done = await rpc("jobs.get", owner="alice", id=job["id"])
    assert done["status"] == "succeeded"
    assert done["output"] == "two"
    assert [(a["n"], a["worker"], a.get("error")) for a in done["attempts"]] == [
        (1, "w1", "lease expired"),
        (2, "w2", None),
    ]
    msg = await ended.next_msg(timeout=2)
    assert loads(msg.data)["job"]["status"] == "succeeded"
    await ended.unsubscribe()


async def finished(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    """The first finished span called ``name`` (waiting up to 5 s: it may end just after the
    message the test saw)."""
    for _ in range(250):
        found = [s for s in exporter.get_finished_spans() if s.name == name]
        if found:
            return found[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {name} span")


async def test_a_job_ends_in_its_submits_trace_when_its_lease_runs_out_or_it_is_cancelled(
    rpc: Any, clock: ManualClock, nc: NATS, subject_prefix: str, spans: InMemorySpanExporter
) -> None:
    caller = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    with start_span("caller", caller):
        job = await rpc(
            "jobs.submit", owner="alice", job={"kind": "lost", "timeout": 5, "max_attempts": 1}
        )
    (offer,) = (await rpc("jobs.claim", kinds=["lost"], owner=None, worker="w", limit=1))["jobs"]
    assert trace_id_of(offer) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert "tracestate" not in offer  # only when the caller had one

    # The sweep (no trace of its own) ends the job: its span joins the submitter's trace.
    ended = await nc.subscribe(Subjects(subject_prefix).broadcast(f"jobs.ended.{job['id']}"))
    clock.advance(6)
    await ended.next_msg(timeout=5)
    await ended.unsubscribe()
    end = await finished(spans, "scheduler.job_end")
    [submit] = [s for s in spans.get_finished_spans() if s.name.endswith(".jobs.submit")]
    assert end.context.trace_id == submit.context.trace_id == int(offer["traceparent"][3:35], 16)
    assert end.parent is not None
    assert end.parent.span_id == submit.context.span_id
    assert end.attributes is not None
    assert end.attributes["shoal.job_status"] == "dead"

    # A queued job cancelled by its owner (a call of another trace) ends in its own trace too.
    with start_span("caller", caller):
        queued = await rpc("jobs.submit", owner="alice", job={"kind": "never"})
    await rpc("jobs.cancel", owner="alice", id=queued["id"])
    ends = [s for s in spans.get_finished_spans() if s.name == "scheduler.job_end"]
    [cancelled] = [s for s in ends if (s.attributes or {}).get("shoal.job_id") == queued["id"]]
    assert cancelled.context.trace_id == submit.context.trace_id


async def test_cancel_and_retry(rpc: Any) -> None:
    queued = await rpc("jobs.submit", owner="alice", job={"kind": "q"})
    assert (await rpc("jobs.cancel", owner="alice", id=queued["id"]))["status"] == "cancelled"
    revived = await rpc("jobs.retry", owner="alice", id=queued["id"])
    assert revived["status"] == "queued"

    running = await rpc("jobs.submit", owner="alice", job={"kind": "r"})
    await rpc("jobs.claim", kinds=["r"], owner=None, worker="w", limit=1)
    asked = await rpc("jobs.cancel", owner="alice", id=running["id"])
    assert asked["status"] == "running"
    assert asked["cancel_requested"] is True
    assert await rpc("jobs.heartbeat", job_id=running["id"], attempt=1) == {
        "ok": True,
        "cancel": True,
    }
    await rpc("jobs.fail", job_id=running["id"], attempt=1, error="stopped")
    assert (await rpc("jobs.get", owner="alice", id=running["id"]))["status"] == "cancelled"
    with pytest.raises(Conflict):
        await rpc("jobs.retry", owner="alice", id=revived["id"])


async def test_terminal_jobs_are_counted_by_outcome_and_dead_letters_by_kind(rpc: Any) -> None:
    kind = new_id("counted")

    def ended(outcome: str) -> float:
        labels = {"kind": kind, "outcome": outcome}
        return REGISTRY.get_sample_value("shoal_jobs_ended_total", labels) or 0.0

    doomed = await rpc("jobs.submit", owner="alice", job={"kind": kind, "max_attempts": 1})
    await rpc("jobs.claim", kinds=[kind], owner=None, worker="w", limit=1)
    await rpc("jobs.fail", job_id=doomed["id"], attempt=1, error="boom")
    assert (await rpc("jobs.get", owner="alice", id=doomed["id"]))["status"] == "dead"
    queued = await rpc("jobs.submit", owner="alice", job={"kind": kind})
    await rpc("jobs.cancel", owner="alice", id=queued["id"])
    with contextlib.suppress(Conflict):  # a second cancel changes nothing
        await rpc("jobs.cancel", owner="alice", id=queued["id"])

    assert REGISTRY.get_sample_value("shoal_jobs_dead_total", {"kind": kind}) == 1.0
    assert (ended("dead"), ended("cancelled"), ended("succeeded")) == (1.0, 1.0, 0.0)
