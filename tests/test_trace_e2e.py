"""One prompt, one trace: the fleet (five ``shoal run`` processes) exports its spans over OTLP
to a stub collector, and the prompt's trace covers the gateway's request, the keys service's
verify RPC, the session's apply, the eventbus's fan-out and the gateway's socket delivery; a file
upload's trace holds the S3 client span of its PutObject (moto's S3 server as the store)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from _otlp import OtlpReceiver, ReceivedSpan, wait_for_spans

from shoal.client import Event, ShoalClient
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


def _covers_every_hop(spans: list[ReceivedSpan]) -> bool:
    hops = _prompt_trace(spans)
    services = {service for service, _ in hops}
    delivered = ("shoal-gateway", "gateway.deliver") in hops
    uploaded = any(_is_s3_put(s) for s in _upload_trace(spans))
    return {"shoal-keys", "shoal-session", "shoal-eventbus"} <= services and delivered and uploaded


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

    spans = await asyncio.to_thread(wait_for_spans, otlp_receiver, _covers_every_hop, 60)
    hops = _prompt_trace(spans)
    print("\nthe prompt's trace:", sorted(hops))
    assert ("shoal-session", "session.apply") in hops
    assert ("shoal-eventbus", "eventbus.fanout") in hops
    assert any(service == "shoal-keys" and name.startswith("rpc ") for service, name in hops)
    upload = _upload_trace(spans)
    print("the upload's trace:", sorted((s.service, s.name) for s in upload))
    assert any(_is_s3_put(s) for s in upload)
