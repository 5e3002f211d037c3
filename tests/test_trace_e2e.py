"""One prompt, one trace: the fleet (five ``shoal run`` processes) exports its spans over OTLP
to a stub collector, and the prompt's trace covers the gateway's request, the keys service's
verify RPC, the session's apply, the eventbus's fan-out and the gateway's socket delivery; a file
upload's trace holds the S3 client span of its PutObject (moto's S3 server as the store); a job's
trace runs from its submit through the scheduler and the worker's socket to its end."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from _otlp import OtlpReceiver, ReceivedSpan, wait_for_spans

from shoal.client import Event, ShoalClient, Worker, WorkerJob
from shoal.devtools.supervisor import FleetFactory

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def _prompt_trace(spans: list[ReceivedSpan]) -> set[tuple[str, str]]:
    """(service, span name) of every span in the trace of the prompt request, if seen yet."""
    requests = [s for s in spans if s.service == "shoal-gateway" and s.name.endswith("/prompts")]
    if not requests:
        return set()
    trace_id = requests[0].trace_id
    return {(s.service, s.name) for s in spans if s.trace_id == trace_id}


def _upload_trace(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    """Every span in the trace of the file upload's request, if seen yet."""
    uploads = [s for s in spans if s.service == "shoal-gateway" and s.name.startswith("PUT ")]
    if not uploads:
        return []
    return [s for s in spans if s.trace_id == uploads[0].trace_id]


def _is_s3_put(span: ReceivedSpan) -> bool:
    """A client span of the botocore/aiobotocore instrumentation for S3 PutObject."""
    return span.attributes.get("rpc.service") == "S3" and span.name == "S3.PutObject"


JOB_HOPS = {
    ("shoal-gateway", "POST /v1/jobs"),
    ("shoal-scheduler", "scheduler.job_start"),
    ("shoal-gateway", "gateway.job_dispatch"),
    ("shoal-gateway", "gateway.job_report"),
    ("shoal-scheduler", "scheduler.job_end"),
}


def _job_trace(spans: list[ReceivedSpan], trace_id: str) -> set[tuple[str, str]]:
    return {(s.service, s.name) for s in spans if s.trace_id == trace_id}


def _covers_every_hop(spans: list[ReceivedSpan], job_trace_id: str) -> bool:
    hops = _prompt_trace(spans)
    services = {service for service, _ in hops}
    delivered = ("shoal-gateway", "gateway.deliver") in hops
    uploaded = any(_is_s3_put(s) for s in _upload_trace(spans))
    worked = JOB_HOPS <= _job_trace(spans, job_trace_id)
    return (
        {"shoal-keys", "shoal-session", "shoal-eventbus"} <= services
        and delivered
        and uploaded
        and worked
    )


async def _work_one_job(gateway_url: str, admin_key: str) -> WorkerJob:
    """Submit a job and let an SDK worker run it; the attempt the handler saw."""
    worker = Worker(gateway_url, admin_key)
    seen: list[WorkerJob] = []

    @worker.handler("traced")
    async def traced(job: WorkerJob) -> str:
        seen.append(job)
        return "ok"

    running = asyncio.create_task(worker.run())
    try:
        async with ShoalClient(gateway_url, api_key=admin_key) as admin, asyncio.timeout(20):
            await worker.connected.wait()
            job = await admin.submit_job("traced")
            while not job.ended:
                await asyncio.sleep(0.05)
                job = await admin.get_job(job.id)
    finally:
        await worker.stop()
        await asyncio.wait_for(running, 10)
    [attempt] = seen
    return attempt


async def test_one_prompt_is_one_trace_through_the_fleet(
    fleet: FleetFactory, otlp_receiver: OtlpReceiver, s3_endpoint: str
) -> None:
    running = await fleet(
        env={
            "SHOAL_OTEL_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "SHOAL_OBJECT_STORE": "s3",
            "SHOAL_S3_ENDPOINT_URL": s3_endpoint,
            "SHOAL_S3_BUCKET": "shoal-trace",
            "SHOAL_S3_ACCESS_KEY_ID": "testing",
            "SHOAL_S3_SECRET_ACCESS_KEY": "testing",
        }
    )
    async with ShoalClient(running.gateway_url, api_key=running.admin_key) as admin:
        session = await admin.create_session({"purpose": "trace"})
        # A key the gateway has never seen: the prompt's request verifies it with the keys
        # service (later requests would find it in the gateway's cache).
        key = await admin.create_key("tracer", ["sessions"])
    async with ShoalClient(running.gateway_url, api_key=key.key) as client:
        opened = asyncio.Event()
        queued: asyncio.Future[Event] = asyncio.get_running_loop().create_future()

        async def watch() -> None:
            async with admin_socket.connect_session(session.id, since=0) as stream:
                opened.set()
                async for event in stream:
                    if event.type == "prompt.queued" and not queued.done():
                        queued.set_result(event)

        async with ShoalClient(running.gateway_url, api_key=running.admin_key) as admin_socket:
            watcher = asyncio.create_task(watch())
            try:
                async with asyncio.timeout(20):
                    await opened.wait()
                await client.submit_prompt(session.id, "trace me")
                async with asyncio.timeout(20):
                    await queued
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
        await client.put_file(session.id, "notes/trace.txt", b"traced", "text/plain")

    attempt = await _work_one_job(running.gateway_url, running.admin_key)
    assert attempt.traceparent is not None
    job_trace_id = attempt.traceparent.split("-")[1]

    spans = await asyncio.to_thread(
        wait_for_spans, otlp_receiver, lambda got: _covers_every_hop(got, job_trace_id), 60
    )
    hops = _prompt_trace(spans)
    print("\nthe prompt's trace:", sorted(hops))
    assert ("shoal-session", "session.apply") in hops
    assert ("shoal-eventbus", "eventbus.fanout") in hops
    assert any(service == "shoal-keys" and name.startswith("rpc ") for service, name in hops)
    upload = _upload_trace(spans)
    print("the upload's trace:", sorted((s.service, s.name) for s in upload))
    assert any(_is_s3_put(s) for s in upload)
    job_hops = _job_trace(spans, job_trace_id)
    print("the job's trace:", sorted(job_hops))
    assert JOB_HOPS <= job_hops
    assert any(name.endswith(".jobs.complete") for _, name in job_hops)
