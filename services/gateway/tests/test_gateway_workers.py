"""Workers over ``/v1/workers/ws`` with the SDK, a real gateway and the real scheduler."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pytest
from jobs_fixtures import job_keys, scheduler  # noqa: F401 - fixtures
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from websockets.asyncio.client import connect

from shoal.client import Job, JobFailed, ShoalClient, ShoalConnectionClosed, Worker, WorkerJob

if TYPE_CHECKING:
    from conftest import RunningGateway

pytestmark = [pytest.mark.usefixtures("scheduler", "job_keys"), pytest.mark.timeout(60)]


@pytest.fixture
async def alice(gateway: RunningGateway) -> AsyncIterator[ShoalClient]:
    async with ShoalClient(gateway.base_url, "key-jobs-alice") as client:
        yield client


@asynccontextmanager
async def working(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.connected.wait(), 10)
    try:
        yield worker
    finally:
        await worker.stop()
        await asyncio.wait_for(task, 10)


async def until(client: ShoalClient, job_id: str, done: Callable[[Job], bool]) -> Job:
    """Poll a job until ``done`` (the HTTP API has no push for one job but /run)."""
    async with asyncio.timeout(20):
        while True:
            job = await client.get_job(job_id)
            if done(job):
                return job
            await asyncio.sleep(0.05)


async def test_a_worker_takes_jobs_of_its_kinds_and_reports_results(
    gateway: RunningGateway, alice: ShoalClient
) -> None:
    worker = Worker(gateway.base_url, "key-work-alice", max_in_flight=4, name="w-test")

    @worker.handler("double")
    async def double(job: WorkerJob) -> Any:
        return job.input * 2

    async with working(worker):
        jobs = [await alice.submit_job("double", n) for n in range(10)]
        done = [await until(alice, j.id, lambda j: j.ended) for j in jobs]
        ran = await alice._http.post("/v1/run", json={"kind": "double", "input": 5, "wait": 10})
    assert [j.output for j in done] == [n * 2 for n in range(10)]
    assert {j.attempts[0].worker for j in done} == {"w-test"}
    assert ran.status_code == 200
    assert ran.json()["output"] == 10


async def finished_spans(
    exporter: InMemorySpanExporter, *names: str, count: int = 1
) -> list[ReadableSpan]:
    """The finished spans once ``count`` of each of ``names`` (a name's start) have ended."""
    async with asyncio.timeout(10):
        while True:
            found = list(exporter.get_finished_spans())
            if all(sum(span.name.startswith(name) for span in found) >= count for name in names):
                return found
            await asyncio.sleep(0.02)


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_job_continues_the_submitters_trace_through_the_worker_and_its_end(
    spans: InMemorySpanExporter, gateway: RunningGateway, alice: ShoalClient
) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    caller = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01", "tracestate": "vendor=v1"}
    seen: list[WorkerJob] = []
    worker = Worker(gateway.base_url, "key-work-alice")

    @worker.handler("traced")
    async def traced(job: WorkerJob) -> Any:
        seen.append(job)
        return "done"

    async with working(worker):
        submitted = await alice._http.post("/v1/jobs", json={"kind": "traced"}, headers=caller)
        assert submitted.status_code == 202, submitted.text
        job = await until(alice, submitted.json()["id"], lambda j: j.ended)
        found = await finished_spans(
            spans,
            "POST /v1/jobs",
            "gateway.job_dispatch",
            "gateway.job_report",
            "scheduler.job_end",
        )
    assert job.status == "succeeded"

    def one(name: str) -> ReadableSpan:
        [span] = [s for s in found if s.name == name or s.name.endswith(f".{name}")]
        return span

    submit, start = one("jobs.submit"), one("scheduler.job_start")
    dispatch, report = one("gateway.job_dispatch"), one("gateway.job_report")
    complete, end = one("jobs.complete"), one("scheduler.job_end")
    chain = [one("POST /v1/jobs"), submit, start, dispatch, report, complete, end]
    assert {format(span.context.trace_id, "032x") for span in chain} == {trace_id}
    # The claim's start and the dispatch hang off the submit RPC (the context stored with the
    # job); the worker got the dispatch span as its parent; the report, the scheduler's RPC and
    # the job's end follow one another.
    assert parent_of(start) == submit.context.span_id
    assert parent_of(dispatch) == submit.context.span_id
    [attempt] = seen
    assert attempt.traceparent == f"00-{trace_id}-{dispatch.context.span_id:016x}-01"
    assert attempt.tracestate == "vendor=v1"
    assert attempt.trace_headers["traceparent"] == attempt.traceparent
    assert parent_of(report) == dispatch.context.span_id
    assert parent_of(complete) == report.context.span_id
    assert parent_of(end) == complete.context.span_id
    # A claim is the socket's, not the job's: it has a trace of its own.
    claims = [s for s in found if s.name.endswith(".jobs.claim")]
    assert claims
    assert all(claim.context.trace_id != int(trace_id, 16) for claim in claims)


async def test_a_report_is_relayed_under_the_workers_span_only_in_the_jobs_trace(
    spans: InMemorySpanExporter, gateway: RunningGateway, alice: ShoalClient
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    own_span = "1111111111111111"
    url = f"{gateway.ws_url}/v1/workers/ws?kinds=raw&max_in_flight=2"
    auth = {"Authorization": "Bearer key-work-alice"}
    async with connect(url, additional_headers=auth, compression=None) as ws:
        for _ in range(2):
            answer = await alice._http.post("/v1/jobs", json={"kind": "raw"}, headers=caller)
            assert answer.status_code == 202
        frames = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2)]
        assert all(frame["traceparent"].split("-")[1] == trace_id for frame in frames)
        mine, foreign = (
            f"00-{trace_id}-{own_span}-01",  # the worker's own span in the job's trace
            f"00-{'2' * 32}-{own_span}-01",  # another trace: ignored
        )
        for frame, traceparent in zip(frames, (mine, foreign), strict=True):
            report = {"type": "job.completed", "job_id": frame["job_id"], "output": 1}
            await ws.send(json.dumps({**report, "traceparent": traceparent}))
        found = await finished_spans(spans, "gateway.job_report", count=2)
    reports = {
        s.attributes["shoal.job_id"]: s
        for s in found
        if s.name == "gateway.job_report" and s.attributes is not None
    }
    dispatched = {
        s.attributes["shoal.job_id"]: s.context.span_id
        for s in found
        if s.name == "gateway.job_dispatch" and s.attributes is not None
    }
    first, second = (str(frame["job_id"]) for frame in frames)
    assert parent_of(reports[first]) == int(own_span, 16)
    assert parent_of(reports[second]) == dispatched[second]
    assert {r.context.trace_id for r in reports.values()} == {int(trace_id, 16)}


async def test_failures_back_off_then_dead_and_retry_revives(
    gateway: RunningGateway, alice: ShoalClient
) -> None:
    calls: list[int] = []
    worker = Worker(gateway.base_url, "key-work-alice")

    @worker.handler("flaky")
    async def flaky(job: WorkerJob) -> Any:
        calls.append(job.attempt)
        if job.attempt <= 3:
            raise RuntimeError(f"boom {job.attempt}")
        return "finally"

    @worker.handler("hopeless")
    async def hopeless(job: WorkerJob) -> Any:
        raise JobFailed({"reason": "bad input"}, retryable=False)

    async with working(worker):
        job = await alice.submit_job("flaky", max_attempts=3)
        dead = await until(alice, job.id, lambda j: j.status == "dead")
        assert [a.n for a in dead.attempts] == [1, 2, 3]
        assert "boom 3" in str(dead.error)
        gaps = [
            (datetime.fromisoformat(b.started_at) - datetime.fromisoformat(a.ended_at or ""))
            for a, b in zip(dead.attempts, dead.attempts[1:], strict=False)
        ]
        # Backoff base 0.1 s in these tests: 0.1 s, then 0.2 s (plus claim latency).
        assert gaps[0].total_seconds() >= 0.1
        assert gaps[1].total_seconds() >= 0.2
        assert (await alice.retry_job(job.id)).status == "queued"
        revived = await until(alice, job.id, lambda j: j.ended)
        assert revived.status == "succeeded"
        assert revived.output == "finally"

        once = await alice.submit_job("hopeless")
        failed = await until(alice, once.id, lambda j: j.ended)
        assert failed.status == "dead"
        assert failed.error == {"reason": "bad input"}
        assert len(failed.attempts) == 1


async def test_cancel_of_a_running_job_reaches_the_worker(
    gateway: RunningGateway, alice: ShoalClient
) -> None:
    started, stopped = asyncio.Event(), asyncio.Event()
    worker = Worker(gateway.base_url, "key-work-alice")

    @worker.handler("slow")
    async def slow(job: WorkerJob) -> Any:
        started.set()
        try:
            await asyncio.sleep(30)
        finally:
            stopped.set()

    async with working(worker):
        job = await alice.submit_job("slow")
        await asyncio.wait_for(started.wait(), 10)
        asked = await alice.cancel_job(job.id)
        assert asked.status == "running"
        assert asked.cancel_requested
        await asyncio.wait_for(stopped.wait(), 10)
        cancelled = await until(alice, job.id, lambda j: j.ended)
    assert cancelled.status == "cancelled"


async def test_a_key_without_the_worker_scope_is_refused(gateway: RunningGateway) -> None:
    worker = Worker(gateway.base_url, "key-jobs-alice")

    @worker.handler("k")
    async def handle(job: WorkerJob) -> Any:
        return None

    with pytest.raises(ShoalConnectionClosed) as refused:
        await asyncio.wait_for(worker.run(), 10)
    assert refused.value.code == 4403
