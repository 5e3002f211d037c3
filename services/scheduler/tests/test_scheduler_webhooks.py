"""Job callbacks against a real HTTP receiver: signatures, retries, rotation, the SSRF guard."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from pydantic import SecretStr

from shoal.common.clock import ManualClock
from shoal.common.errors import BadRequest
from shoal.common.messaging import Subjects, loads, request
from shoal.common.observability import start_span, trace_id_of
from shoal.scheduler.app import create_app
from shoal.scheduler.config import SchedulerSettings
from shoal.scheduler.webhooks import verify

pytestmark = pytest.mark.timeout(60)


class Receiver:
    """A tiny HTTP/1.1 server: answers each POST with the next status, keeps what it got."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")[1:]
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        status = self.statuses.pop(0) if self.statuses else 200
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()
        await self.received.put((headers, body))

    async def __aenter__(self) -> Receiver:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def settings_for(
    nats_url: str, database_url: str, prefix: str, *, allow_private: bool
) -> SchedulerSettings:
    return SchedulerSettings(
        environment="test",
        nats_url=nats_url,
        database_url=SecretStr(database_url),
        subject_prefix=prefix,
        log_json=False,
        scheduler_sweep_interval=timedelta(milliseconds=50),
        scheduler_webhooks_allow_private=allow_private,
        scheduler_webhook_timeout=timedelta(seconds=2),
    )


@asynccontextmanager
async def scheduler(settings: SchedulerSettings, clock: ManualClock) -> AsyncIterator[None]:
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        yield


async def next_delivery(receiver: Receiver, clock: ManualClock) -> tuple[dict[str, str], bytes]:
    """Advance the clock a second at a time until the receiver gets the retry."""
    for _ in range(20):
        clock.advance(1)
        try:
            return await asyncio.wait_for(receiver.received.get(), 0.5)
        except TimeoutError:
            continue
    raise AssertionError("no retry arrived")


async def test_a_callback_is_signed_retried_after_a_500_and_recorded(
    nats_url: str, database_url: str, subject_prefix: str, nc: NATS
) -> None:
    clock = ManualClock(start=time.time())
    settings = settings_for(nats_url, database_url, subject_prefix, allow_private=True)
    subjects = Subjects(subject_prefix)

    async def rpc(method: str, **body: Any) -> Any:
        return await request(nc, subjects.rpc("scheduler", method), body)

    async with Receiver([500]) as receiver, scheduler(settings, clock):
        secret = (await rpc("webhooks.secret", owner="alice"))["secret"]
        assert secret.startswith("whsec_")
        assert (await rpc("webhooks.secret", owner="alice"))["secret"] == secret
        submitter = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
        with start_span("submitter", submitter):
            job = await rpc(
                "jobs.submit", owner="alice", job={"kind": "k", "callback_url": receiver.url}
            )
        await rpc("jobs.claim", kinds=["k"], owner=None, worker="w", limit=1)
        await rpc("jobs.complete", job_id=job["id"], attempt=1, output={"ok": True})

        headers, body = await asyncio.wait_for(receiver.received.get(), 10)
        assert verify(body, headers["shoal-signature"], secret, now=clock.now())
        assert not verify(body, headers["shoal-signature"], "whsec_wrong", now=clock.now())
        assert not verify(body + b" ", headers["shoal-signature"], secret, now=clock.now())
        assert loads(body)["status"] == "succeeded"
        assert headers["shoal-job-id"] == job["id"]
        # The delivery is a span in the submitter's trace; the receiver can continue it.
        assert trace_id_of(headers) == "4bf92f3577b34da6a3ce929d0e0e4736"

        headers, body = await next_delivery(receiver, clock)  # after the 1 s backoff
        assert verify(body, headers["shoal-signature"], secret, now=clock.now())
        deliveries = loads(body)["deliveries"]
        assert [d["status"] for d in deliveries] == [500]

        # Rotation: the next callbacks carry both signatures for the overlap.
        rotated = await rpc("webhooks.rotate", owner="alice")
        assert rotated["secret"] != secret
        assert "previous_expires_at" in rotated
        second = await rpc(
            "jobs.submit", owner="alice", job={"kind": "k", "callback_url": receiver.url}
        )
        await rpc("jobs.cancel", owner="alice", id=second["id"])
        headers, body = await asyncio.wait_for(receiver.received.get(), 10)
        assert verify(body, headers["shoal-signature"], rotated["secret"], now=clock.now())
        assert verify(body, headers["shoal-signature"], secret, now=clock.now())
        assert loads(body)["status"] == "cancelled"


async def test_private_callback_urls_are_refused_by_default(
    nats_url: str, database_url: str, subject_prefix: str, nc: NATS
) -> None:
    clock = ManualClock(start=time.time())
    settings = settings_for(nats_url, database_url, subject_prefix, allow_private=False)
    subject = Subjects(subject_prefix).rpc("scheduler", "jobs.submit")
    async with scheduler(settings, clock):
        for url in (
            "http://127.0.0.1:8080/hook",
            "http://10.1.2.3/hook",
            "http://[::1]/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://localhost/hook",
            "ftp://example.com/hook",
            "https://user:pw@example.com/hook",
        ):
            with pytest.raises(BadRequest):
                await request(
                    nc, subject, {"owner": "a", "job": {"kind": "k", "callback_url": url}}
                )
        accepted = await request(
            nc,
            subject,
            {"owner": "a", "job": {"kind": "k", "callback_url": "https://example.com/h"}},
        )
        assert accepted["callback_url"] == "https://example.com/h"
